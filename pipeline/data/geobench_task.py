"""GEO-Bench tasks read through geobench's own loader, preprocessed as the reference does.

Per sample: pack the three RGB bands, divide by the task's ``band_scale`` and clip to [0, 1],
resize the shorter side to ``img_size`` (bilinear, antialiased), map to [-1, 1]. Labels stay at
the task's original size: an int (classification), a 0/1 vector (multi-label) or a class map
(segmentation).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import Config, ConfigError, geobench_root
from ..errors import UserError

GEOBENCH_SPLITS = {"train": "train", "val": "valid", "test": "test"}


@dataclass(frozen=True)
class KnownTask:
    geobench_task: str
    bands: tuple[str, str, str]
    band_scale: float


# The reference's datasets: where GEO-Bench keeps them, which bands make RGB, and the divisor
# it applies (m-chesapeake is only clipped to [0, 1], as the reference does).
KNOWN_TASKS = {
    "meurosat": KnownTask("classification_v1.0/m-eurosat", ("04", "03", "02"), 4095.0),
    "mbigearthnet": KnownTask("classification_v1.0/m-bigearthnet", ("04", "03", "02"), 4095.0),
    "mnz-cattle": KnownTask("segmentation_v1.0/m-nz-cattle", ("Red", "Green", "Blue"), 255.0),
    "mchesapeake": KnownTask("segmentation_v1.0/m-chesapeake", ("Red", "Green", "Blue"), 1.0),
}


@dataclass(frozen=True)
class TaskSource:
    """Everything needed to read one GEO-Bench task the way a config asks."""

    name: str
    kind: str
    root: Path  # the GEO-Bench root
    geobench_task: str  # the task's folder under root
    bands: tuple[str, ...]
    band_scale: float
    img_size: int
    num_classes: int
    partition: str = "default"

    @classmethod
    def from_config(cls, cfg: Config) -> "TaskSource":
        task, bands, scale = task_settings(cfg)
        missing = [k for k, v in (("geobench_task", task), ("bands", bands), ("band_scale", scale)) if not v]
        if missing:
            raise ConfigError(
                f"{cfg.config_file}: dataset {cfg.dataset_name!r} is not one of {sorted(KNOWN_TASKS)}; "
                f"set {', '.join(missing)} in its task file"
            )
        return cls(
            cfg.dataset_name, cfg.task, geobench_root(cfg), task, tuple(bands), float(scale),
            cfg.img_size, cfg.num_classes, cfg.partition,
        )

    @property
    def task_dir(self) -> Path:
        return Path(self.root) / self.geobench_task


def task_settings(cfg: Config) -> tuple:
    """(GEO-Bench task folder, bands, band_scale) from the config, else the known-task table; None
    for what neither sets."""
    known = KNOWN_TASKS.get(cfg.dataset_name)
    task = cfg.geobench_task or (known and known.geobench_task) or None
    bands = cfg.bands or (known and known.bands) or None
    scale = cfg.band_scale if cfg.band_scale is not None else (known and known.band_scale) or None
    return task, bands, scale


def scaling_text(band_scale: float) -> str:
    """How images become model input, as a cache's provenance records it."""
    return f"x / {float(band_scale):g}, clip [0, 1], bilinear antialiased resize, (x - 0.5) / 0.5"


def to_model_input(rgb: np.ndarray, band_scale: float, img_size: int) -> torch.Tensor:
    """(H, W, 3) raw band values -> (3, S, S') float32 in [-1, 1], as the reference."""
    image = torch.from_numpy(np.clip(rgb.transpose(2, 0, 1).astype(np.float32) / band_scale, 0, 1))
    h, w = image.shape[-2:]
    short, long = min(h, w), max(h, w)
    size = (img_size, int(img_size * long / short))
    size = size if h <= w else size[::-1]
    if (h, w) != size:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (image - 0.5) / 0.5


class GeoBenchSplit(Dataset):
    """One split of a task: ``{"image", "label", "name", "index"}`` per sample."""

    def __init__(self, source: TaskSource, split: str):
        if split not in GEOBENCH_SPLITS:
            raise UserError(f"split {split!r} is not one of {list(GEOBENCH_SPLITS)}")
        if not (source.task_dir / "task_specs.pkl").is_file():
            raise FileNotFoundError(
                f"GEO-Bench task not found in {source.task_dir} (no task_specs.pkl); set geobench_dir "
                f"or GEO_BENCH_DIR to the folder holding {source.geobench_task}"
            )
        # `import geobench` creates $GEO_BENCH_DIR (default ~/dataset/geobench); point it at the
        # root in use so that nothing is created elsewhere.
        os.environ.setdefault("GEO_BENCH_DIR", str(source.root))
        from geobench.dataset import GeobenchDataset

        self.source = source
        self.split = split
        try:
            self._ds = GeobenchDataset(
                dataset_dir=source.task_dir, split=GEOBENCH_SPLITS[split],
                partition_name=source.partition, band_names=source.bands,
            )
        except (ValueError, AssertionError) as err:
            raise UserError(f"cannot open {source.task_dir} split {split!r}: {err}") from None
        self.names = list(self._ds.active_partition.partition_dict[GEOBENCH_SPLITS[split]])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        sample = self._ds.get_sample(self.names[index])
        rgb, _ = sample.pack_to_3d(band_names=self.source.bands)
        return {
            "image": to_model_input(rgb, self.source.band_scale, self.source.img_size),
            "label": self._label(sample),
            "name": sample.sample_name,
            "index": index,
        }

    def _label(self, sample) -> np.ndarray:
        label = sample.label
        kind = self.source.kind
        if kind == "segmentation":
            if not hasattr(label, "data"):
                raise UserError(f"{self.source.task_dir}: task is segmentation but {sample.sample_name} has no label map")
            return np.asarray(label.data).astype(np.uint8)
        if kind == "multi_label_classification":
            vector = np.asarray(label).astype(np.uint8).reshape(-1)
            if len(vector) != self.source.num_classes:
                raise UserError(f"{self.source.task_dir}: {sample.sample_name} has {len(vector)} labels but "
                                f"num_classes is {self.source.num_classes}; fix num_classes in the task file")
            return vector
        if hasattr(label, "data"):
            raise UserError(f"{self.source.task_dir}: task is {kind} but {sample.sample_name} has a label map")
        return np.asarray(int(label), dtype=np.int64)

    def content_hash(self) -> str:
        """SHA-256 over the task specs, the partition and every sample file of this split, so a
        cache is rebuilt when the data under it changes, not only its sample names."""
        digest = hashlib.sha256()
        task_dir = self.source.task_dir
        files = [task_dir / "task_specs.pkl", task_dir / f"{self.source.partition}_partition.json"]
        files += [task_dir / f"{name}.hdf5" for name in self.names]
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    def provenance(self) -> dict:
        names_hash = hashlib.sha256(json.dumps(self.names).encode()).hexdigest()[:16]
        return {
            "name": self.source.name,
            "task": self.source.kind,
            "geobench_task": self.source.geobench_task,
            "split": self.split,
            "partition": self.source.partition,
            "num_samples": len(self.names),
            "sample_names_sha256": names_hash,
            "content_sha256": self.content_hash(),
            "bands": list(self.source.bands),
            "scaling": scaling_text(self.source.band_scale),
            "img_size": self.source.img_size,
            "num_classes": self.source.num_classes,
        }


def collate(batch: list[dict]) -> dict:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": np.stack([b["label"] for b in batch]),
        "name": [b["name"] for b in batch],
        "index": [b["index"] for b in batch],
    }
