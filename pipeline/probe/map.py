"""Offline probing: where in the UNet, and at which timestep, the classes separate.

One scikit-learn probe per (timestep, layer) of the cache, one per timestep over all layers
concatenated, and one over everything, fitted on train, their regularisation chosen on val,
reported on test. No backbone is loaded: classification probes read the cache's pooled vectors,
segmentation probes its maps.

- Single-label: standardised features, multinomial logistic regression, C from ``c_grid`` by
  validation accuracy; test accuracy and macro-F1. Also k-NN (k = 5, cosine) on the raw vectors.
- Multi-label: one-vs-rest logistic regression; micro-F1 at 0.5 (selects C) and mean average
  precision over the classes present in test.
- Segmentation: every map bilinearly resized to one grid (the widest map by default), labels
  brought to that grid by majority; a fixed seeded sample of pixels per training image; per-pixel
  logistic regression, C by validation mIoU; test mIoU on every pixel of the grid (or on a seeded
  sample of ``seg_eval_pixels`` per image).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..cache.reader import FeatureCache
from ..errors import UserError
from ..metrics import confusion, segmentation_metrics

ALL = "all"


class ProbeError(UserError):
    """A probe asked of something that cannot give it (bad settings, caches, partitions)."""


@dataclass(frozen=True)
class ProbeSettings:
    c_grid: tuple = (0.001, 0.01, 0.1, 1.0, 10.0)
    knn_k: int = 5
    max_iter: int = 300
    tol: float = 1e-3
    n_jobs: int = 2
    seg_grid: int | None = None  # None: the widest map of the cache
    seg_pixels: int = 64  # pixels sampled per training image
    seg_eval_pixels: int | None = None  # pixels per val/test image; None: every pixel of the grid
    max_gb: float = 8.0  # refuse a probe run whose inputs would exceed this in memory
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict, source: str = "probe settings") -> ProbeSettings:
        """Settings from params or ``--set`` values, checked up front."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ProbeError(f"{source}: unknown keys {unknown}; known: {sorted(known)}")
        out = dict(values)
        if "c_grid" in out:
            grid = out["c_grid"] if isinstance(out["c_grid"], (list, tuple)) else [out["c_grid"]]
            if not grid or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in grid):
                raise ProbeError(f"{source}: c_grid {out['c_grid']!r} must be a list of positive numbers")
            out["c_grid"] = tuple(float(c) for c in grid)
        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for key in ("knn_k", "max_iter", "n_jobs", "seg_pixels", "seg_eval_pixels"):
            if key == "seg_eval_pixels" and out.get(key) is None:
                continue
            if key in out and not (integer(out[key]) and out[key] > 0):
                raise ProbeError(f"{source}: {key} {out[key]!r} must be a positive integer")
        for key in ("tol", "max_gb"):
            if key in out and not (isinstance(out[key], (int, float)) and not isinstance(out[key], bool) and out[key] > 0):
                raise ProbeError(f"{source}: {key} {out[key]!r} must be a positive number")
        if "seed" in out and not (integer(out["seed"]) and out["seed"] >= 0):
            raise ProbeError(f"{source}: seed {out['seed']!r} must be a non-negative integer")
        if out.get("seg_grid") is not None and not (isinstance(out["seg_grid"], int) and out["seg_grid"] > 0):
            raise ProbeError(f"{source}: seg_grid {out['seg_grid']!r} must be a positive integer or null")
        return cls(**out)


@dataclass(frozen=True)
class Cell:
    timestep: str  # a label key or "all"
    layer: str  # a layer name or "all"

    def parts(self, timesteps: list[str], layers: list[str]) -> list[tuple[str, str]]:
        ts = timesteps if self.timestep == ALL else [self.timestep]
        ls = layers if self.layer == ALL else [self.layer]
        return [(t, l) for t in ts for l in ls]


def map_cells(timesteps: list[str], layers: list[str]) -> list[Cell]:
    """Every (timestep, layer), then each timestep over all layers, then everything."""
    return [Cell(t, l) for t in timesteps for l in layers] + [Cell(t, ALL) for t in timesteps] + [Cell(ALL, ALL)]


# ---- features ------------------------------------------------------------------------------------


class Split:
    """One split's probe inputs, read once and kept: pooled vectors, or for segmentation the maps
    resized to the grid at the split's pixel positions. ``subset`` views a part of it without reading."""

    def __init__(self, cache: FeatureCache, settings: ProbeSettings, grid: int = 0, sample_pixels: bool = False):
        self.cache, self.settings, self.grid = cache, settings, grid
        self.rows = np.arange(len(cache))
        self.base: Split | None = None
        self._parts: dict = {}
        self._labels = None
        self._pixels = None
        if grid:
            g2 = grid * grid
            n_pix = settings.seg_pixels if sample_pixels else settings.seg_eval_pixels
            if n_pix and n_pix < g2:  # a fixed seeded sample of positions per image
                rng = np.random.default_rng(settings.seed)
                self._pixels = np.stack([np.sort(rng.choice(g2, n_pix, replace=False)) for _ in range(len(cache))])
            else:
                self._pixels = np.tile(np.arange(g2), (len(cache), 1))

    def subset(self, rows) -> Split:
        view = object.__new__(Split)
        view.__dict__.update(cache=self.cache, settings=self.settings, grid=self.grid, base=self,
                             rows=np.asarray(rows, dtype=np.int64), _parts={}, _labels=None, _pixels=None)
        return view

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pixels_per_image(self) -> int:
        return (self.base or self)._pixels.shape[1]

    def part(self, t: str, layer: str) -> np.ndarray:
        """(rows, C) for pooled probes, (rows x pixels, C) for segmentation."""
        if self.base is not None:
            return take_images(self.base.part(t, layer), self.rows, self.pixels_per_image if self.grid else 0)
        if (t, layer) not in self._parts:
            self._parts[(t, layer)] = self._read(t, layer)
        return self._parts[(t, layer)]

    def _read(self, t: str, layer: str) -> np.ndarray:
        if not self.grid:
            return self.cache.pooled(self.rows, [t], [layer])[t][layer].numpy().astype(np.float32)
        out = []
        step = self.cache.plan.shard_size
        for start in range(0, len(self.rows), step):  # a shard at a time: the maps are never all in memory
            maps = self.cache.features(self.rows[start : start + step], [t], [layer])[t][layer]
            out.append(sample_pixels(maps, self._pixels[start : start + step], self.grid))
        return np.concatenate(out)

    def matrix(self, cell: Cell, timesteps, layers) -> np.ndarray:
        parts = [self.part(t, l) for t, l in cell.parts(timesteps, layers)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def labels(self, num_classes: int) -> np.ndarray:
        """Per image; for segmentation per grid pixel (majority over each cell's pixels) at the split's positions."""
        if self.base is not None:
            return take_images(self.base.labels(num_classes), self.rows, self.pixels_per_image if self.grid else 0)
        if self._labels is None:
            if not self.grid:
                self._labels = self.cache.labels(self.rows).numpy()
                return self._labels
            parts, step = [], self.cache.plan.shard_size  # one-hot masks a shard at a time, not the split
            for start in range(0, len(self.rows), step):
                masks = self.cache.labels(self.rows[start : start + step]).numpy()
                parts.append(grid_labels(masks, self._pixels[start : start + step], num_classes, self.grid))
            self._labels = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return self._labels


def take_images(whole: np.ndarray, rows: np.ndarray, per_image: int) -> np.ndarray:
    """The rows of images ``rows`` of a split's inputs: one row per image, or ``per_image`` pixels each."""
    if not per_image:
        return whole[rows]
    return whole.reshape(-1, per_image, *whole.shape[1:])[rows].reshape(-1, *whole.shape[1:])


def sample_pixels(maps: torch.Tensor, pixels: np.ndarray, grid: int) -> np.ndarray:
    """(images x pixels, C) float32: ``maps`` (images, C, H, W) resized to the grid, at each image's
    ``pixels`` (flat grid positions, one row per image)."""
    maps = F.interpolate(maps.float(), size=(grid, grid), mode="bilinear", align_corners=False).flatten(2)
    pos = torch.from_numpy(pixels)
    picked = torch.gather(maps, 2, pos[:, None, :].expand(-1, maps.shape[1], -1)).permute(0, 2, 1)
    return picked.reshape(-1, maps.shape[1]).numpy()


def grid_labels(masks: np.ndarray, pixels: np.ndarray, num_classes: int, grid: int) -> np.ndarray:
    """(images x pixels,) the majority class of each grid cell of ``masks`` (images, H, W), at ``pixels``."""
    onehot = F.one_hot(torch.from_numpy(masks.astype(np.int64)), num_classes).permute(0, 3, 1, 2).float()
    cells = F.adaptive_avg_pool2d(onehot, grid).argmax(dim=1).flatten(1)
    return torch.gather(cells, 1, torch.from_numpy(pixels)).reshape(-1).numpy()


def seg_grid(cache: FeatureCache, settings: ProbeSettings) -> int:
    return settings.seg_grid or max(s[-1] for s in cache.layer_shapes.values())


# ---- probes --------------------------------------------------------------------------------------


def _logistic(X_tr, y_tr, X_va, y_va, settings: ProbeSettings, score, one_vs_rest: bool = False):
    """Standardise, fit one model per C, keep the best on val. Single-label fits are warm-started from
    the previous C; one-vs-rest refits from scratch (it clones its estimator on every fit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_tr)
    X_tr, X_va = scaler.transform(X_tr), scaler.transform(X_va)
    best = None
    base = LogisticRegression(max_iter=settings.max_iter, tol=settings.tol, warm_start=True)
    model = OneVsRestClassifier(base) if one_vs_rest else base
    for c in sorted(settings.c_grid):
        model.set_params(**({"estimator__C": c} if one_vs_rest else {"C": c}))
        model.fit(X_tr, y_tr)
        val = score(y_va, model, X_va)
        if best is None or val > best[1]:
            best = (c, val, copy.deepcopy(model))
    return scaler, best


def _accuracy(y, model, X) -> float:
    return float((model.predict(X) == y).mean())


def _micro_f1(y, model, X) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, (model.predict_proba(X) > 0.5).astype(int), average="micro", zero_division=0))


def mean_average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    present = y.sum(axis=0) > 0
    return float(np.mean([average_precision_score(y[:, k], scores[:, k]) for k in np.flatnonzero(present)]))


def probe_cell(cell: Cell, splits: dict, task: str, num_classes: int, timesteps, layers,
               settings: ProbeSettings) -> dict:
    """Fit and score one probe; returns one row of the probe map."""
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier

    X = {s: splits[s].matrix(cell, timesteps, layers) for s in ("train", "val", "test")}
    y = {s: splits[s].labels(num_classes) for s in ("train", "val", "test")}
    row = {"timestep": cell.timestep, "layer": cell.layer, "n_train": len(splits["train"]), "dims": int(X["train"].shape[1])}
    if task == "multi_label_classification":
        scaler, (c, val, model) = _logistic(X["train"], y["train"], X["val"], y["val"], settings, _micro_f1, True)
        test = scaler.transform(X["test"])
        row.update(metric="micro_f1", C=c, val=val, value=_micro_f1(y["test"], model, test),
                   mean_average_precision=mean_average_precision(y["test"], model.predict_proba(test)))
        return row
    if task == "segmentation":
        scaler, (c, val, model) = _logistic(X["train"], y["train"], X["val"], y["val"], settings, _miou(num_classes))
        m = segmentation_metrics(confusion(y["test"], model.predict(scaler.transform(X["test"])), num_classes))
        row.update(metric="miou", C=c, val=val, value=m["miou"], pixel_accuracy=m["pixel_accuracy"],
                   n_train_pixels=len(y["train"]))
        return row
    scaler, (c, val, model) = _logistic(X["train"], y["train"], X["val"], y["val"], settings, _accuracy)
    pred = model.predict(scaler.transform(X["test"]))
    knn = KNeighborsClassifier(min(settings.knn_k, len(y["train"])), metric="cosine", algorithm="brute")
    knn.fit(X["train"], y["train"])
    row.update(metric="accuracy", C=c, val=val, value=float((pred == y["test"]).mean()),
               macro_f1=float(f1_score(y["test"], pred, average="macro", labels=list(range(num_classes)), zero_division=0)),
               knn_accuracy=float((knn.predict(X["test"]) == y["test"]).mean()))
    return row


def _miou(num_classes: int):
    def score(y, model, X) -> float:
        return segmentation_metrics(confusion(y, model.predict(X), num_classes))["miou"]

    return score


class Probe:
    """Probes over one task's train/val/test caches; their inputs are read once and shared by every run.
    With a ``distributed.Client`` they are read and fitted on its cluster (``dask_probe``)."""

    def __init__(self, caches: dict, task: str, num_classes: int, settings: ProbeSettings = ProbeSettings(),
                 client=None):
        self.task, self.num_classes, self.settings = task, num_classes, settings
        # Segmentation probes read maps, the others pooled vectors: a cache without them is refused
        # here, in one line, before anything is read.
        for cache in caches.values():
            cache.require("maps" if task == "segmentation" else "pooled", f"a {task.replace('_', '-')} probe")
        self.timesteps, self.layers = list(caches["train"].timesteps), list(caches["train"].layers)
        self.grid = seg_grid(caches["train"], settings) if task == "segmentation" else 0
        self._check_memory(caches)
        self.splits = {name: Split(cache, settings, self.grid, sample_pixels=name == "train")
                       for name, cache in caches.items()}
        self.cluster = None
        if client is not None:
            from .dask import ClusterInputs

            self.cluster = ClusterInputs(self, client)

    def _check_memory(self, caches: dict) -> None:
        dims = sum(shape[0] for shape in caches["train"].layer_shapes.values()) * len(self.timesteps)
        rows = 0
        for name, cache in caches.items():
            per_image = 1
            if self.grid:
                n_pix = self.settings.seg_pixels if name == "train" else self.settings.seg_eval_pixels
                per_image = min(n_pix or self.grid**2, self.grid**2)
            rows += len(cache) * per_image
        # every single cell is kept, and the widest probe (all cells) is copied once more
        per_row = dims * 4 * 2 / 2**30
        gb = rows * per_row
        if gb > self.settings.max_gb:
            raise ProbeError(
                f"probing {rows} rows x {dims} features needs about {gb:.1f} GB, over max_gb={self.settings.max_gb:g}; "
                f"lower seg_pixels, seg_eval_pixels or seg_grid, or raise max_gb{self._fitting_pixels(caches, per_row)}"
            )

    def _fitting_pixels(self, caches: dict, gb_per_row: float) -> str:
        """For segmentation, the pixel sample per image (train and eval alike) that fits max_gb:
        at real size every pixel of val and test is far more than any memory (m-chesapeake's
        1,000 val images at the 32 x 32 grid: about 420 GB)."""
        if not self.grid:
            return ""
        images = sum(len(c) for c in caches.values())
        pixels = int(self.settings.max_gb / gb_per_row // images)
        if pixels < 1:
            return f" (even one pixel per image needs {images * gb_per_row:.1f} GB)"
        return f" (a sample of {pixels} pixels per image fits: --set seg_pixels={pixels} --set seg_eval_pixels={pixels})"

    def train_labels(self, indices=None) -> np.ndarray:
        """The labels the probes train on (per image, or per sampled grid pixel), of ``indices`` of train."""
        if self.cluster is None:
            train = self.splits["train"]
            return (train if indices is None else train.subset(indices)).labels(self.num_classes)
        labels = self.cluster.fetch_labels("train")
        return labels if indices is None else take_images(labels, np.asarray(indices), self.cluster.per_image("train"))

    def cells(self) -> list[Cell]:
        return map_cells(self.timesteps, self.layers)

    def run(self, cells: list[Cell] | None = None, train_indices=None) -> list[dict]:
        """Rows of the probe map (see ``probe_cell``) in the order of ``cells`` (default: all), with the
        probes trained on ``train_indices`` of the train cache (default: all of it)."""
        from joblib import Parallel, delayed

        cells = cells or self.cells()
        if self.cluster is not None:
            from .dask import run_on_cluster

            return run_on_cluster(self, self.cluster, cells, train_indices)
        splits = dict(self.splits)
        if train_indices is not None:
            splits["train"] = self.splits["train"].subset(train_indices)
        # Read every needed part here, once, so the threads below only compute.
        needed = dict.fromkeys(p for c in cells for p in c.parts(self.timesteps, self.layers))
        for split in self.splits.values():
            split.labels(self.num_classes)
            for t, layer in needed:
                split.part(t, layer)
        run = delayed(probe_cell)
        return Parallel(n_jobs=self.settings.n_jobs, prefer="threads")(
            run(cell, splits, self.task, self.num_classes, self.timesteps, self.layers, self.settings) for cell in cells
        )


def probe_map(caches: dict, task: str, num_classes: int, settings: ProbeSettings = ProbeSettings(),
              train_indices=None, cells: list[Cell] | None = None) -> list[dict]:
    """Every probe of the map (or ``cells``), in one call; see ``Probe``."""
    return Probe(caches, task, num_classes, settings).run(cells, train_indices)


def best_cells(rows: list[dict]) -> dict[str, Cell]:
    """By validation score: the best single layer, the best timestep concatenation, and all."""
    single = [r for r in rows if r["timestep"] != ALL and r["layer"] != ALL]
    per_t = [r for r in rows if r["timestep"] != ALL and r["layer"] == ALL]
    pick = lambda rs: max(rs, key=lambda r: r["val"])  # noqa: E731
    out = {"best layer": pick(single), "best timestep": pick(per_t)} if single and per_t else {}
    out["all"] = next(r for r in rows if r["timestep"] == ALL and r["layer"] == ALL)
    return {k: Cell(r["timestep"], r["layer"]) for k, r in out.items()}


def settings_dict(settings: ProbeSettings, grid: int | None = None) -> dict:
    d = asdict(settings)
    d["c_grid"] = list(d["c_grid"])
    if grid:
        d["seg_grid"] = grid
    return d


__all__ = ["ALL", "Cell", "Probe", "ProbeError", "ProbeSettings", "best_cells", "map_cells", "probe_map"]
