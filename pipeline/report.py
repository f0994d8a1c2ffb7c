"""The report: every fit's and probe's metrics in one table, and the cost ledger of the whole set.

``reports/summary.csv`` has one row per result (task, kind, fuser or probe, seed, partition,
metric, value, UNet passes spent and the reference's for the same work); ``reports/summary.md``
shows the same as tables, the ledger (passes spent on extraction and fits against the passes the
reference recomputes for the same fits) and links to the plots.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .cache.reader import open_cache
from .cache.store import CacheError

COLUMNS = ["task", "kind", "fuser", "seed", "partition", "metric", "value", "unet_passes", "reference_unet_passes"]


def cache_ledgers(cache_root: Path) -> list[dict]:
    """One row per split cache under ``cache_root/<dataset>/<split>.zarr``: what its extraction spent."""
    rows = []
    for path in sorted(cache_root.glob("*/*.zarr")):
        try:
            cache = open_cache(str(path))
        except CacheError:  # not a cache: nothing was spent that can be counted
            continue
        ledger = cache.attrs.get("ledger", {})
        if "bytes_stored" not in ledger:  # caches written before the ledger counted bytes
            from .cache.audit import cache_info

            ledger = {**ledger, "bytes_stored": cache_info(cache)["bytes_on_disk"]}
        rows.append({"dataset": path.parent.name, "split": path.stem, "images": len(cache),
                     "unet_passes": int(ledger.get("unet_passes", 0)), "vae_passes": int(ledger.get("vae_passes", 0)),
                     "bytes_stored": int(ledger.get("bytes_stored", 0)) or None,
                     "extract_seconds": ledger.get("extract_seconds")})
    return rows


def fit_rows(exp_root: Path) -> list[dict]:
    rows = []
    for path in sorted(exp_root.glob("**/metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(exp_root).parts):
            continue  # a fit's partial output (pipeline.outputs), not a result
        if not (path.parent / "run.json").is_file():
            continue  # not a fit's run folder
        # A run's numbers are in metrics.json, what it was in run.json.
        m = {**json.loads((path.parent / "run.json").read_text()), **json.loads(path.read_text())}
        metric = m["selection_metric"]
        ledger = m.get("ledger", {})
        rows.append({"task": m["dataset"], "kind": "fit", "fuser": m["fuser"], "seed": m.get("seed"),
                     "partition": m.get("partition", "default"), "metric": metric, "value": m["test"][metric],
                     "unet_passes": ledger.get("unet_passes", 0), "reference_unet_passes": ledger.get("reference_unet_passes"),
                     "_epochs": m.get("epochs_run"), "_seconds": m.get("train_seconds"), "_dir": str(path.parent)})
    return rows


def probe_rows(probe_root: Path) -> list[dict]:
    rows = []
    for path in sorted(probe_root.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        task = path.parent.name
        for name in ("best_layer", "best_timestep", "all"):
            if name in m:
                cell = m[name]
                rows.append({"task": task, "kind": "probe", "fuser": f"{name} ({cell['timestep']}, {cell['layer']})",
                             "seed": "", "partition": "default", "metric": m["metric"], "value": cell["test"],
                             "unet_passes": 0, "reference_unet_passes": ""})
        curve = path.parent / "label_efficiency.csv"
        if curve.exists():
            with open(curve) as f:
                for r in csv.DictReader(f):
                    if r["value"] == "":
                        continue
                    seed = r["draw"].removeprefix("seed ") if r["draw"] != "partition" else ""
                    rows.append({"task": task, "kind": "label_efficiency",
                                 "fuser": f"{r['probe'].replace(' ', '_')} ({r['timestep']}, {r['layer']})",
                                 "seed": seed, "partition": r["partition"], "metric": r["metric"],
                                 "value": float(r["value"]), "unet_passes": 0, "reference_unet_passes": ""})
    return rows


def ledger_totals(caches: list[dict], fits: list[dict]) -> dict:
    extraction = sum(c["unet_passes"] for c in caches)
    spent = extraction + sum(int(f["unet_passes"] or 0) for f in fits)
    reference = sum(int(f["reference_unet_passes"] or 0) for f in fits)
    return {"extraction_unet_passes": extraction, "fit_unet_passes": spent - extraction, "unet_passes_spent": spent,
            "reference_unet_passes": reference, "ratio": round(reference / spent, 2) if spent else None,
            "extraction_vae_passes": sum(c["vae_passes"] for c in caches),
            "bytes_stored": sum(c["bytes_stored"] or 0 for c in caches), "fits": len(fits)}


def write_report(out_dir: str | Path = "reports", exp_root: str | Path = "experiments", probe_root: str | Path = "probes",
                 cache_root: str | Path = "cache") -> dict:
    """Gather every result under the three roots into ``out_dir``; returns the ledger totals."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    caches = cache_ledgers(Path(cache_root))
    fits, probes = fit_rows(Path(exp_root)), probe_rows(Path(probe_root))
    totals = ledger_totals(caches, fits)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(fits + probes)
    (out_dir / "summary.md").write_text(_markdown(out_dir, Path(probe_root), caches, fits, probes, totals))
    (out_dir / "ledger.json").write_text(json.dumps(totals, indent=2) + "\n")
    return totals


def _markdown(out_dir: Path, probe_root: Path, caches, fits, probes, totals) -> str:
    def link(path: Path) -> str:
        return os.path.relpath(path, out_dir)

    lines = ["# Summary", "", "## Fits (test split)", "",
             "| task | fuser | seed | metric | value | epochs | train s | UNet passes | reference's |", "|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        lines.append(f"| {f['task']} | {f['fuser']} | {f['seed']} | {f['metric']} | {f['value']:.4f} | {f['_epochs']} | "
                     f"{f['_seconds']} | {f['unet_passes']:,} | {int(f['reference_unet_passes'] or 0):,} |")
    lines += ["", "## Probes (test split; cells chosen on val)", "", "| task | probe | metric | value |", "|---|---|---|---|"]
    lines += [f"| {p['task']} | {p['fuser']} | {p['metric']} | {p['value']:.4f} |" for p in probes if p["kind"] == "probe"]
    curve = [p for p in probes if p["kind"] == "label_efficiency" and p["seed"] == ""]
    if curve:
        parts = list(dict.fromkeys(p["partition"] for p in curve))
        names = list(dict.fromkeys((p["task"], p["fuser"]) for p in curve))
        lines += ["", "## Label efficiency (GEO-Bench partitions; random draws in summary.csv)", "",
                  "| task | probe | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
        value = {(p["task"], p["fuser"], p["partition"]): p["value"] for p in curve}
        for task, name in names:
            cells = [f"{value[(task, name, part)]:.3f}" if (task, name, part) in value else "–" for part in parts]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost ledger", "", "| cache | images | UNet passes | VAE passes | MiB stored | extract s |", "|---|---|---|---|---|---|"]
    for c in caches:
        mib = f"{c['bytes_stored'] / 2**20:.1f}" if c["bytes_stored"] else "–"
        lines.append(f"| {c['dataset']}/{c['split']} | {c['images']} | {c['unet_passes']:,} | {c['vae_passes']:,} | {mib} | "
                     f"{c['extract_seconds'] if c['extract_seconds'] is not None else '–'} |")
    lines += ["", f"- UNet passes spent: **{totals['unet_passes_spent']:,}** ({totals['extraction_unet_passes']:,} in "
              f"extraction, {totals['fit_unet_passes']:,} in {totals['fits']} fits)",
              f"- UNet passes the reference runs for the same {totals['fits']} fits (features recomputed for every "
              f"training batch, validation and test evaluation): **{totals['reference_unet_passes']:,}**",
              f"- ratio: **{totals['ratio']}×**" if totals["ratio"] else "- ratio: –", "", "## Plots", ""]
    for f in fits:
        for png in sorted(Path(f["_dir"], "plots").glob("*.png")):
            lines.append(f"- {f['task']} / {f['fuser']}: [{png.stem}]({link(png)})")
    for task in dict.fromkeys(p["task"] for p in probes):
        for png in (probe_root / task / "heatmap.png", probe_root / task / "label_efficiency.png"):
            if png.exists():
                lines.append(f"- {task} / probes: [{png.stem}]({link(png)})")
    return "\n".join(lines) + "\n"
