"""Plots of a fit, as PNG (for reading) and CSV (for `dvc plots`, which renders offline as JSON).

Files in ``<out_dir>/plots/``: ``curves.png`` + ``history.csv`` (one level up); ``fusion.png`` +
``fusion.csv`` (GW weights or LW mean gates per timestep x layer, or MoE expert usage per scale);
``confusion.png`` + ``confusion.csv`` (classification) or ``iou.png`` + ``iou.csv`` (segmentation).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(out_dir: Path, result, model, aux: dict) -> None:
    folder = Path(out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    _curves(plt, folder, result.history, result.metrics["selection_metric"])
    if "weights" in aux:
        _fusion_table(plt, folder, aux["weights"], model.fuser.timesteps, model.fuser.layers, model.config.fuser)
    if "expert_usage" in aux:
        _expert_usage(plt, folder, aux["expert_usage"], list(model.fuser.scales))
    test = result.metrics["test"]
    names = list(result.class_names) if result.class_names else None
    if "iou" in test:
        _iou(plt, folder, test["iou"], names)
    elif "confusion_matrix" in test:
        _confusion(plt, folder, np.asarray(test["confusion_matrix"]), names)


def _curves(plt, folder: Path, history: list, select: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["train_loss"] for r in history], label="train loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    evals = [(r["step"], r[f"val_{select}"]) for r in history if f"val_{select}" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label=f"val {select}")
        ax2.set_ylabel(f"val {select}")
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)


def _fusion_table(plt, folder: Path, table: np.ndarray, timesteps, layers, kind: str) -> None:
    with open(folder / "fusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestep", "layer", "weight"])
        for ti, t in enumerate(timesteps):
            for li, layer in enumerate(layers):
                w.writerow([t, layer, f"{table[ti, li]:.6g}"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 2 + 0.4 * len(timesteps)))
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), [l.replace("up_blocks_", "") for l in layers], rotation=90, fontsize=7)
    ax.set_yticks(range(len(timesteps)), timesteps)
    ax.set_title("GW mixing weights" if kind == "gw" else "LW mean gate (validation)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "fusion.png", dpi=110)
    plt.close(fig)


def _expert_usage(plt, folder: Path, usage: np.ndarray, scales) -> None:
    with open(folder / "fusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scale", "expert", "usage"])
        for si, s in enumerate(scales):
            for e, u in enumerate(usage[si]):
                w.writerow([s, e, f"{u:.6g}"])
    fig, ax = plt.subplots(figsize=(6, 2 + 0.4 * len(scales)))
    im = ax.imshow(usage, aspect="auto", cmap="magma")
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(scales)), [f"{s}x{s}" for s in scales])
    ax.set_title("MoE expert usage (validation)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "fusion.png", dpi=110)
    plt.close(fig)


def _class_labels(names: list | None, n: int) -> list:
    return names if names and len(names) == n else list(range(n))


def _confusion(plt, folder: Path, cm: np.ndarray, names: list | None = None) -> None:
    labels = _class_labels(names, len(cm))
    with open(folder / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for a in range(len(cm)):
            for p in range(len(cm)):
                w.writerows([[labels[a], labels[p]]] * int(cm[a, p]))
    side = 4 + 0.25 * max(0, len(cm) - 8)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    for (a, p), n in np.ndenumerate(cm):
        ax.text(p, a, str(n), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cm)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(cm)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(folder / "confusion.png", dpi=110)
    plt.close(fig)


def _iou(plt, folder: Path, iou: list, names: list | None = None) -> None:
    labels = _class_labels(names, len(iou))
    with open(folder / "iou.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou"])
        w.writerows([[c, f"{v:.6g}"] for c, v in zip(labels, iou)])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(range(len(iou)), iou)
    ax.set_xticks(range(len(iou)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("test IoU per class")
    fig.tight_layout()
    fig.savefig(folder / "iou.png", dpi=110)
    plt.close(fig)


# ---- probes -------------------------------------------------------------------------------------


def probe_heatmap(path: Path, rows: list[dict], timesteps: list[str], layers: list[str], metric: str,
                  best=None) -> None:
    """Test metric per timestep x layer, an "all layers" column per timestep and the all-cell below
    it; the best single cell (by validation) is framed."""
    plt = _pyplot()
    table = np.full((len(timesteps) + 1, len(layers) + 1), np.nan)
    cols = {layer: j for j, layer in enumerate(layers)} | {"all": len(layers)}
    rows_of = {t: i for i, t in enumerate(timesteps)} | {"all": len(timesteps)}
    for r in rows:
        if r.get("value") is not None:
            table[rows_of[r["timestep"]], cols[r["layer"]]] = r["value"]
    fig, ax = plt.subplots(figsize=(0.62 * (len(layers) + 1) + 2, 0.6 * (len(timesteps) + 1) + 2.2))
    image = ax.imshow(np.ma.masked_invalid(table), cmap="viridis", aspect="auto")
    for i, j in zip(*np.nonzero(~np.isnan(table))):
        ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                color="white" if table[i, j] < np.nanmean(table) else "black")
    if best is not None:
        i, j = rows_of[best.timestep], cols[best.layer]
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.axvline(len(layers) - 0.5, color="white", lw=2)
    ax.axhline(len(timesteps) - 0.5, color="white", lw=2)
    ax.set_xticks(range(len(layers) + 1), [l.replace("up_blocks_", "up") for l in layers] + ["all layers"],
                  rotation=70, fontsize=7)
    ax.set_yticks(range(len(timesteps) + 1), list(timesteps) + ["all"])
    ax.set_title(f"probe map: test {metric} (framed: best single cell on val)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_efficiency_plot(path: Path, curve: list[dict], metric: str, note: str | None = None) -> None:
    """Metric vs training fraction per probe: the partition's value as a line, random draws of the
    same size as dots with their min-max range; ``note`` is written across the axes (why a curve is empty)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if note:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
    for k, probe in enumerate(dict.fromkeys(r["probe"] for r in curve)):
        mine = [r for r in curve if r["probe"] == probe and r["value"] is not None]
        color = f"C{k}"
        shift = 1.04 ** (k - 1)  # side by side on the log axis, so the bars do not hide each other
        official = sorted((r["fraction"] * shift, r["value"]) for r in mine if r["draw"] == "partition")
        label = f"{probe} ({mine[0]['timestep']}, {mine[0]['layer']})" if mine else probe
        if official:
            ax.plot(*zip(*official), "o-", color=color, label=label)
        for f in sorted({r["fraction"] for r in mine if r["draw"] != "partition"}):
            values = [r["value"] for r in mine if r["fraction"] == f]
            ax.vlines(f * shift, min(values), max(values), color=color, alpha=0.5)
            ax.plot([f * shift] * len(values), values, ".", color=color, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training fraction (GEO-Bench partition)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("label efficiency (bars: partition and random draws of its size)")
    if curve:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the report ---------------------------------------------------------------------------------


def grid_label_efficiency_plot(path: Path, curve: list[dict], metrics: dict[str, str]) -> None:
    """One panel per task, metric vs training fraction: each fuser's IQM over seeds with its
    interval as a band, each probe's partition value (dashed) with the range of its random draws;
    last, the aggregate over tasks of the fusers' normalised scores. ``curve`` holds the rows of
    the report's label_efficiency.csv."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in curve))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in curve if r["task"] == task]
        methods = list(dict.fromkeys((r["kind"], r["method"]) for r in mine))
        for k, (kind, method) in enumerate(methods):
            points = sorted((r["fraction"], r["value"], r["low"], r["high"]) for r in mine
                            if (r["kind"], r["method"]) == (kind, method))
            x, y, low, high = (np.array(v, dtype=float) for v in zip(*points))
            style = "o-" if kind == "fit" else "s--"
            ax.plot(x, y, style, color=f"C{k}", ms=4, lw=1.4 if kind == "fit" else 1, label=method)
            if np.isnan(low).all():
                continue
            if kind == "fit" and len(x) > 1:
                ax.fill_between(x, low, high, color=f"C{k}", alpha=0.2, lw=0)
            else:  # a band needs two fractions: bars show a lone point's interval, and a probe's draws
                ax.errorbar(x, y, yerr=[y - low, high - y], fmt="none", color=f"C{k}", capsize=3, alpha=0.6)
        if len({r["fraction"] for r in mine}) > 1:
            ax.set_xscale("log")
        ax.set_xlabel("training fraction (GEO-Bench partition)")
        ax.set_ylabel("normalised IQM" if task == "aggregated" else f"test {metrics.get(task, '')}")
        ax.set_title("aggregated over tasks" if task == "aggregated" else task)
        ax.legend(fontsize=7)
    fig.suptitle("label efficiency (fits: IQM over seeds and its interval; probes: partition and random draws)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
