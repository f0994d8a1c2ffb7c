"""`satdifuser task inspect`: what a GEO-Bench task folder holds, read the way extraction reads it.

Per band the stored dtype and the value range over a sample of images; the label kind, the classes
the task specs name and the label values present in the sample; the samples of every partition
file per split; and, for the RGB bands and divisor extraction would use (the known-task table for
the folder's name, or a config), the share of pixel values that clipping to [0, 1] would cut.
Facts that could not be confirmed from GEO-Bench's sources are decided here, on the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .geobench_task import KNOWN_BY_FOLDER, label_problem, load_task_specs, partition_file

PERCENTILES = (1, 50, 99)
# Values kept per band and image for the percentiles: enough for their second digit, few enough
# that a 500 x 500 x 369 band does not fill memory.
VALUES_PER_IMAGE = 20_000
LABEL_KINDS = {"Classification": "classification", "MultiLabelClassification": "multi_label_classification",
               "SegmentationClasses": "segmentation"}


@dataclass(frozen=True)
class Scaling:
    """The RGB bands and the divisor extraction applies to them, and where they were taken from."""

    bands: tuple[str, ...]
    band_scale: float
    origin: str
    kind: str | None = None
    num_classes: int | None = None


def scaling_of(task_dir: Path, config: str | None = None) -> Scaling | None:
    """From ``config`` when given, else from the known-task table by the folder's name; None when
    neither knows the task."""
    if config:
        from ..config import load_config
        from .geobench_task import task_settings

        cfg = load_config(config)
        _, bands, scale = task_settings(cfg)
        if not bands or not scale:
            raise UserError(f"{config} sets no bands and band_scale, and {cfg.dataset_name!r} is not a known task")
        return Scaling(tuple(bands), float(scale), config, cfg.task, cfg.num_classes)
    known = KNOWN_BY_FOLDER.get(Path(task_dir).name)
    if known is None:
        return None
    return Scaling(known.bands, known.band_scale, f"known task {known.geobench_task}", known.task, known.num_classes)


def inspect_task(task_dir: str | Path, samples: int = 32, config: str | None = None,
                 clip_warn: float = 0.03) -> dict:
    """The report of a task folder (see the module's docstring); ``samples`` images, spread evenly
    over the folder's sample files, give the value ranges and label values."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise UserError(f"{task_dir} is not a folder; give a GEO-Bench task folder, e.g. "
                        "$GEO_BENCH_DIR/classification_v1.0/m-eurosat")
    specs = load_task_specs(task_dir)
    files = sorted(task_dir.glob("*.hdf5"))
    if not files:
        raise UserError(f"{task_dir} holds no sample files (*.hdf5); is it a GEO-Bench task folder?")
    picked = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, min(samples, len(files))).astype(int))]
    label_type = specs.label_type
    kind = LABEL_KINDS.get(type(label_type).__name__, type(label_type).__name__)
    n_classes = getattr(label_type, "n_classes", None)
    bands, labels, shapes = _read(picked, kind)
    scaling = scaling_of(task_dir, config)
    report = {
        "task_dir": str(task_dir),
        "task": f"{specs.benchmark_name}/{specs.dataset_name}",
        "patch_size": list(specs.patch_size) if specs.patch_size else None,
        "sample_files": len(files),
        "sampled": len(picked),
        "label": {"kind": kind, "n_classes": n_classes, "class_names": _names(label_type),
                  "values": labels, "label_shapes": sorted(shapes)},
        "bands": {name: _band_stats(parts) for name, parts in bands.items()},
        "partitions": _partitions(task_dir),
        "scaling": None,
        "warnings": [],
    }
    if scaling:
        report["scaling"] = _clipping(scaling, bands, report["warnings"], clip_warn)
        _check_labels(scaling, kind, n_classes, labels, report["warnings"])
    return report


def _names(label_type) -> list | None:
    try:
        names = getattr(label_type, "class_names", None)
    except AttributeError:  # a label type pickled before it had names
        return None
    return list(names) if names else None


def _read(paths: list[Path], kind: str):
    from geobench.dataset import load_sample_hdf5

    bands: dict[str, list] = {}
    labels: dict = {}
    shapes = set()
    rng = np.random.default_rng(0)
    for path in paths:
        try:
            sample = load_sample_hdf5(path)
        except (OSError, KeyError, ValueError) as err:
            raise UserError(f"{path} is not a readable GEO-Bench sample ({err}); restore it from the download") from None
        for band in sample.bands:
            values = np.asarray(band.data)
            flat = values.reshape(-1)
            if flat.size > VALUES_PER_IMAGE:
                flat = flat[rng.choice(flat.size, VALUES_PER_IMAGE, replace=False)]
            bands.setdefault(band.band_info.name, []).append((values.dtype, values.shape, flat))
        label = sample.label.data if hasattr(sample.label, "data") else sample.label
        label = np.asarray(label)
        shapes.add(tuple(label.shape))
        _count(labels, label, kind)
    return bands, {str(k): v for k, v in sorted(labels.items())}, shapes


def _count(counts: dict, label: np.ndarray, kind: str) -> None:
    """Images per class (classification), positives per class (multi-label) or pixels per value."""
    if kind == "multi_label_classification":
        for index in np.flatnonzero(label.reshape(-1)):
            counts[int(index)] = counts.get(int(index), 0) + 1
        return
    values, n = np.unique(label, return_counts=True)
    for value, count in zip(values.tolist(), n.tolist()):
        counts[value] = counts.get(value, 0) + count


def _band_stats(parts: list) -> dict:
    values = np.concatenate([flat for _, _, flat in parts]).astype(np.float64)
    finite = values[np.isfinite(values)]
    stats = {
        "dtype": ", ".join(sorted({str(d) for d, _, _ in parts})),
        "shape": "x".join(map(str, parts[0][1])),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "non_finite": int(values.size - finite.size),
    }
    for q, v in zip(PERCENTILES, np.percentile(finite, PERCENTILES) if finite.size else [None] * 3):
        stats[f"p{q}"] = None if v is None else float(v)
    return stats


def _partitions(task_dir: Path) -> dict:
    out = {}
    for path in sorted(task_dir.glob("*_partition.json")):
        name = path.name[: -len("_partition.json")]
        try:
            with open(partition_file(task_dir, name)) as f:
                content = json.load(f)
        except UserError as err:
            out[name] = {"error": str(err)}
            continue
        except (OSError, ValueError) as err:
            out[name] = {"error": f"{path} is not readable JSON ({err})"}
            continue
        out[name] = {split: len(names) for split, names in content.items()}
    return out


def _clipping(scaling: Scaling, bands: dict, warnings: list, clip_warn: float) -> dict:
    """The share of each RGB band's sampled values that x / band_scale puts below 0 or above 1."""
    out = {"from": scaling.origin, "bands": list(scaling.bands), "band_scale": scaling.band_scale, "per_band": {}}
    for asked in scaling.bands:
        name = _band_named(asked, bands)
        if name is None:
            warnings.append(f"RGB band {asked!r} ({scaling.origin}) is not among the task's bands {sorted(bands)}")
            continue
        values = np.concatenate([flat for _, _, flat in bands[name]]).astype(np.float64) / scaling.band_scale
        below, above = float(np.mean(values < 0)), float(np.mean(values > 1))
        p99 = float(np.percentile(values, 99))
        out["per_band"][name] = {"clipped_below_0": below, "clipped_above_1": above, "p99_scaled": p99}
        if below + above > clip_warn:
            warnings.append(f"{name}: x / {scaling.band_scale:g} clips {100 * (below + above):.1f} % of the sampled "
                            f"values ({100 * above:.1f} % above 1, {100 * below:.1f} % below 0), more than "
                            f"{100 * clip_warn:g} %; set band_scale (the values reach {_max(bands[name]):g})")
        elif p99 < 0.05:
            warnings.append(f"{name}: x / {scaling.band_scale:g} puts 99 % of the sampled values below {p99:.3f}, a "
                            f"small part of [0, 1]; set a smaller band_scale (the values reach {_max(bands[name]):g})")
    return out


def _max(parts: list) -> float:
    return float(max(np.nanmax(flat) for _, _, flat in parts))


def _band_named(asked: str, bands: dict) -> str | None:
    """The stored band name that ``asked`` (a name or one of geobench's alt names) refers to."""
    from geobench import dataset as gb

    if asked in bands:
        return asked
    infos = gb.sentinel2_13_bands + gb.landsat8_9_bands + gb.make_rgb_bands(1)
    for info in infos:
        if asked in (info.name, *info.alt_names) and info.name in bands:
            return info.name
    return None


def _check_labels(scaling: Scaling, kind: str, n_classes, labels: dict, warnings: list) -> None:
    if scaling.kind and scaling.kind != kind:
        warnings.append(f"{scaling.origin} reads the task as {scaling.kind}, its task specs say {kind}")
    if scaling.num_classes and n_classes and scaling.num_classes != n_classes:
        warnings.append(f"{scaling.origin} has {scaling.num_classes} classes, the task specs {n_classes}")
    if scaling.num_classes and kind != "multi_label_classification":
        present = np.array([int(float(v)) for v in labels], dtype=np.int64)
        problem = label_problem(present, kind, scaling.num_classes)
        if problem:
            warnings.append(f"the sampled images hold {problem} ({scaling.origin}: {scaling.num_classes} classes); "
                            "extraction will stop at the first such sample")


def format_inspection(report: dict) -> str:
    def num(v):
        return "-" if v is None else f"{v:.6g}"

    label = report["label"]
    names = label["class_names"]
    lines = [
        f"task         {report['task']}  ({report['task_dir']})",
        f"patch size   {report['patch_size']}; {report['sample_files']} sample files, {report['sampled']} sampled",
        f"label        {label['kind']}, {label['n_classes']} classes"
        + (f": {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}" if names else " (no class names stored)"),
        f"label values {_values_text(label)}",
        "bands        name                              dtype      shape          min          p1         p50"
        "         p99         max",
    ]
    for name, s in report["bands"].items():
        lines.append(f"  {name:<40} {s['dtype']:<10} {s['shape']:<12} {num(s['min']):>10} {num(s['p1']):>11} "
                     f"{num(s['p50']):>11} {num(s['p99']):>11} {num(s['max']):>11}"
                     + (f"  ({s['non_finite']} non-finite)" if s["non_finite"] else ""))
    lines.append("partitions" + ("   none" if not report["partitions"] else ""))
    for name, sizes in report["partitions"].items():
        text = sizes["error"] if "error" in sizes else ", ".join(f"{k} {v}" for k, v in sizes.items())
        lines.append(f"  {name:<16} {text}")
    scaling = report["scaling"]
    if scaling is None:
        lines.append("scaling      unknown task folder: give --config to check a scaling")
    else:
        per_band = "; ".join(f"{b} {100 * (v['clipped_below_0'] + v['clipped_above_1']):.1f} % clipped, p99 "
                             f"{v['p99_scaled']:.3f}" for b, v in scaling["per_band"].items())
        lines.append(f"scaling      {'/'.join(scaling['bands'])} / {scaling['band_scale']:g} ({scaling['from']}): "
                     f"{per_band}")
    lines += [f"warning      {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _values_text(label: dict) -> str:
    what = {"classification": "images", "multi_label_classification": "positives", "segmentation": "pixels"}
    unit = what.get(label["kind"], "count")
    names = label["class_names"] or []

    def named(value: str) -> str:
        i = int(float(value))
        return f"{value} ({names[i]})" if 0 <= i < len(names) else value

    shown = ", ".join(f"{named(v)}: {n}" for v, n in label["values"].items())
    return f"{shown}  ({unit} in the sampled images)"
