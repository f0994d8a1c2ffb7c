"""Fake GEO-Bench v1 tasks of the real tasks' shapes, written with geobench's own writer.

Each fake has its task's bands (names, order, dtype, value range as the converters store them), label
kind and classes, and native patch size; only the number of samples is small (4 train, 2 valid,
2 test). The partition is saved as geobench's converters save it: ``original`` with
``default_partition.json`` linked to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.geobench_task import KNOWN_TASKS

SPLITS = ["train"] * 4 + ["valid"] * 2 + ["test"] * 2


@dataclass(frozen=True)
class Fake:
    dataset: str  # key of KNOWN_TASKS
    exp: str  # configs/<exp>_exp.yaml
    bands: str  # which geobench band list (see _bands)
    dtype: str
    high: float  # values drawn in [low, high)
    low: float = 0.0


FAKES = [
    Fake("mbigearthnet", "ben", "s2_12", "float32", 4000),
    Fake("mbrick-kiln", "brickkiln", "s2_13", "uint16", 4000),
    Fake("meurosat", "eurosat", "s2_13", "int16", 4000),
    Fake("mforestnet", "forestnet", "landsat_6", "uint8", 256),
    Fake("mpv4ger", "pv4ger", "rgb", "uint8", 256),
    Fake("mso2sat", "so2sat", "s1_8_s2_10", "float32", 0.4),
    Fake("mcashew-plant", "cashew", "s2_12_cloud", "float32", 4000),
    Fake("mchesapeake", "chesa", "rgb_nir", "float32", 1.0),
    Fake("mNeonTree", "neontree", "rgb_chm_hs", "uint8", 256),
    Fake("mnz-cattle", "nzcattle", "rgb", "uint8", 256),
    Fake("mpv4ger-seg", "pv4gerseg", "rgb", "uint8", 256),
    Fake("mSA-crop-type", "sacrop", "s2_12_cloud", "int16", 4000),
]


def _bands(gb, which: str) -> list:
    s2 = gb.sentinel2_13_bands
    no_cirrus = s2[:10] + s2[11:]
    return {
        "s2_13": s2,
        "s2_12": s2[0:10] + s2[-2:],
        "s2_12_cloud": no_cirrus + [gb.CloudProbability(alt_names=("CPL", "CLD"), spatial_resolution=10)],
        "s1_8_s2_10": gb.sentinel1_8_bands + s2[1:9] + s2[-2:],
        "landsat_6": gb.landsat8_9_bands[3:0:-1] + gb.landsat8_9_bands[4:7],
        "rgb": gb.make_rgb_bands(0.1),
        "rgb_nir": gb.make_rgb_bands(1) + [gb.SpectralBand("NearInfrared", ("nir",), 1, 0.876)],
        "rgb_chm_hs": gb.make_rgb_bands(0.1) + [
            gb.ElevationBand("Canopy Height Model", alt_names=("lidar", "CHM"), spatial_resolution=0.1),
            gb.HyperSpectralBands("Neon", n_bands=369, spatial_resolution=1)],
    }[which]


def _label_type(gb, known):
    names = list(known.class_names)
    if known.task == "segmentation":
        return gb.SegmentationClasses("label", spatial_resolution=1, n_classes=len(names), class_names=names)
    if known.task == "multi_label_classification":
        return gb.MultiLabelClassification(len(names), class_names=names)
    return gb.Classification(len(names), names)


def _band_data(info, size: int, fake: Fake, rng) -> np.ndarray:
    if info.name == "Neon":  # NeonTree's hyperspectral cube, at 1 m beside the 10 cm RGB
        return rng.random((size // 10, size // 10, 369)).astype(np.float32)
    if info.name == "Canopy Height Model":
        return (rng.random((size // 10, size // 10)) * 30).astype(np.float32)
    if type(info).__name__ == "Sentinel1":  # complex and filtered backscatter, signed
        return rng.uniform(-1, 1, (size, size)).astype(np.float32)
    return rng.uniform(fake.low, fake.high, (size, size)).astype(fake.dtype)


def label_of(fake: Fake, i: int, size: int):
    """Sample ``i``'s label: every class of a split-varying pattern, so no training split has one class."""
    known = KNOWN_TASKS[fake.dataset]
    n = known.num_classes
    if known.task == "segmentation":
        return ((np.arange(size)[:, None] // max(1, size // 4) + i) % n).repeat(size, 1).astype(np.int16)
    if known.task == "multi_label_classification":
        return ((np.arange(n) + i) % 2).astype(np.uint8)
    return i % n


def write_fake(root: Path, fake: Fake, labels: dict | None = None, seed: int = 0) -> Path:
    """Write ``fake`` under the GEO-Bench root ``root``; ``labels`` replaces given samples' labels
    (sample index -> label). Returns the task folder."""
    import geobench as gb

    known = KNOWN_TASKS[fake.dataset]
    task_dir = Path(root) / known.geobench_task
    task_dir.mkdir(parents=True, exist_ok=True)
    size = known.original_img_size
    rng = np.random.default_rng(seed)
    infos = _bands(gb, fake.bands)
    label_type = _label_type(gb, known)
    partition = gb.Partition()
    for i, split in enumerate(SPLITS):
        name = f"s{i}"
        bands = [gb.Band(_band_data(info, size, fake, rng), info, 1, convert_to_int16=False) for info in infos]
        label = (labels or {}).get(i, label_of(fake, i, size))
        if known.task == "segmentation":
            label = gb.Band(np.asarray(label), label_type, 1)
        gb.Sample(bands, label, name).write(str(task_dir))
        partition.add(split, name)
    gb.TaskSpecifications(dataset_name=task_dir.name, benchmark_name=task_dir.parent.name, patch_size=(size, size),
                          n_time_steps=1, spatial_resolution=1, bands_info=infos,
                          label_type=label_type).save(str(task_dir), overwrite=True)
    partition.save(str(task_dir), "original", as_default=True)
    return task_dir
