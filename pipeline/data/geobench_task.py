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
import pickle
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
    """What GEO-Bench v1 stores for a task and how the model reads it (checked against the task
    files by `satdifuser task inspect`)."""

    geobench_task: str  # folder under the GEO-Bench root
    bands: tuple[str, str, str]  # the RGB bands, by the names geobench stores (alt names accepted)
    band_scale: float  # divisor before clipping to [0, 1]
    task: str  # label kind (config.TASK_KINDS)
    class_names: tuple[str, ...]
    original_img_size: int  # the task's patch size
    img_size: int  # model input: a DiffusionSat checkpoint resolution (256 or 512)
    prompt: str = "A satellite image"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def folder(self) -> str:
        return self.geobench_task.rsplit("/", 1)[-1]


NUMBERED_RGB = ("04", "03", "02")  # Sentinel-2 and Landsat-8 bands 4, 3, 2
RGB = ("Red", "Green", "Blue")
# GEO-Bench's converters (geobench/benchmark/dataset_converters) take these names from torchgeo.
BIGEARTHNET_43 = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites", "Dump sites",
    "Construction sites", "Green urban areas", "Sport and leisure facilities", "Non-irrigated arable land",
    "Permanently irrigated land", "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves",
    "Pastures", "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation", "Agro-forestry areas",
    "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland", "Moors and heathland",
    "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes", "Salines",
    "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
)
EUROSAT = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake")
FORESTNET = ("Oil palm plantation", "Timber plantation", "Other large-scale plantations", "Grassland shrubland",
             "Small-scale agriculture", "Small-scale mixed plantation", "Small-scale oil palm plantation", "Mining",
             "Fish pond", "Logging", "Secondary forest", "Other")
SO2SAT_LCZ = ("Compact high rise", "Compact mid rise", "Compact low rise", "Open high rise", "Open mid rise",
              "Open low rise", "Lightweight low rise", "Large low rise", "Sparsely built", "Heavy industry",
              "Dense trees", "Scattered trees", "Bush, scrub", "Low plants", "Bare rock or paved", "Bare soil or sand",
              "Water")
CASHEW = ("no data", "well-managed plantation", "poorly-managed plantation", "non-plantation", "residential",
          "background", "uncertain")
CHESAPEAKE = ("water", "tree-canopy-forest", "low-vegetation-field", "barren-land", "impervious-other",
              "impervious-roads", "no data")
SA_CROP = ("No Data", "Lucerne/Medics", "Planted pastures (perennial)", "Fallow", "Wine grapes", "Weeds",
           "Small grain grazing", "Wheat", "Canola", "Rooibos")

# The twelve GEO-Bench v1 tasks. Scaling: Sentinel-2 digital numbers (reflectance x 10000) are
# divided by 4095 as the reference does for m-eurosat and m-bigearthnet; m-so2sat stores
# reflectance itself (float), so 0.4095 is the same scaling; 8-bit RGB (PNG sources) by 255;
# m-chesapeake is only clipped, as the reference does. img_size: the reference's 256, and 512 for
# m-nz-cattle; for the others the checkpoint resolution nearest the native patch size.
_C, _M, _S = "classification", "multi_label_classification", "segmentation"
KNOWN_TASKS = {
    "mbigearthnet": KnownTask("classification_v1.0/m-bigearthnet", NUMBERED_RGB, 4095.0, _M, BIGEARTHNET_43, 120, 256),
    "mbrick-kiln": KnownTask("classification_v1.0/m-brick-kiln", NUMBERED_RGB, 4095.0, _C,
                             ("not brick kiln", "brick kiln"), 64, 256),
    "meurosat": KnownTask("classification_v1.0/m-eurosat", NUMBERED_RGB, 4095.0, _C, EUROSAT, 64, 256),
    "mforestnet": KnownTask("classification_v1.0/m-forestnet", NUMBERED_RGB, 255.0, _C, FORESTNET, 332, 256),
    "mpv4ger": KnownTask("classification_v1.0/m-pv4ger", RGB, 255.0, _C, ("no solar pv", "solar pv"), 320, 256),
    "mso2sat": KnownTask("classification_v1.0/m-so2sat", NUMBERED_RGB, 0.4095, _C, SO2SAT_LCZ, 32, 256),
    "mcashew-plant": KnownTask("segmentation_v1.0/m-cashew-plant", NUMBERED_RGB, 4095.0, _S, CASHEW, 256, 256,
                               "A satellite image of cashew plantations"),
    "mchesapeake": KnownTask("segmentation_v1.0/m-chesapeake", RGB, 1.0, _S, CHESAPEAKE, 256, 256,
                             "A satellite image of Cheasapeake landcovers"),
    "mNeonTree": KnownTask("segmentation_v1.0/m-NeonTree", RGB, 255.0, _S, ("no tree", "tree"), 400, 512,
                           "A satellite image of tree crowns"),
    "mnz-cattle": KnownTask("segmentation_v1.0/m-nz-cattle", RGB, 255.0, _S, ("no cattle", "cattle"), 500, 512,
                            "A satellite image of New Zealand cattles"),
    "mpv4ger-seg": KnownTask("segmentation_v1.0/m-pv4ger-seg", RGB, 255.0, _S, ("no solar pv", "solar pv"), 320, 256,
                             "A satellite image of solar panels"),
    "mSA-crop-type": KnownTask("segmentation_v1.0/m-SA-crop-type", NUMBERED_RGB, 4095.0, _S, SA_CROP, 256, 256,
                               "A satellite image of South African crop fields"),
}
KNOWN_BY_FOLDER = {known.folder: known for known in KNOWN_TASKS.values()}


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
    class_names: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> TaskSource:
        task, bands, scale = task_settings(cfg)
        missing = [k for k, v in (("geobench_task", task), ("bands", bands), ("band_scale", scale)) if not v]
        if missing:
            raise ConfigError(
                f"{cfg.config_file}: dataset {cfg.dataset_name!r} is not one of {sorted(KNOWN_TASKS)}; "
                f"set {', '.join(missing)} in its task file"
            )
        return cls(
            cfg.dataset_name, cfg.task, geobench_root(cfg), task, tuple(bands), float(scale),
            cfg.img_size, cfg.num_classes, cfg.partition, class_names(cfg),
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


def class_names(cfg: Config) -> tuple[str, ...] | None:
    """The class names of the config (``class_names``, or the reference's ``class_list``), else of
    the known-task table; None when neither names them. Refused when their number is not
    ``num_classes``."""
    known = KNOWN_TASKS.get(cfg.dataset_name)
    names = cfg.class_names or cfg.class_list or (known and known.class_names) or None
    if names and len(names) != cfg.num_classes:
        key = "class_names" if cfg.class_names else "class_list" if cfg.class_list else None
        where = f"{key} in the task file" if key else f"the known classes of {cfg.dataset_name}"
        raise ConfigError(f"{cfg.config_file}: {where} name {len(names)} classes but num_classes is "
                          f"{cfg.num_classes}; make them agree")
    return tuple(names) if names else None


def _import_geobench(root: Path):
    # `import geobench` creates $GEO_BENCH_DIR (default ~/dataset/geobench); point it at the root
    # in use so that nothing is created elsewhere.
    os.environ.setdefault("GEO_BENCH_DIR", str(root))
    import geobench

    return geobench


def load_task_specs(task_dir: Path):
    """The task's ``task_specs.pkl`` through geobench's own loader, which maps the module names of
    older geobench versions (``ccb.io.*``, ``geobench.io.*``) to today's classes."""
    task_dir = Path(task_dir)
    path = task_dir / "task_specs.pkl"
    if not path.is_file():
        raise UserError(f"GEO-Bench task not found in {task_dir} (no task_specs.pkl); set geobench_dir or "
                        "GEO_BENCH_DIR to the folder holding the task's benchmark folder")
    geobench = _import_geobench(task_dir.parent.parent)
    from geobench.task import load_task_specs as geobench_load

    try:
        return geobench_load(task_dir)
    except AssertionError:
        raise UserError(f"{path} does not hold geobench TaskSpecifications; restore it from the GEO-Bench "
                        "download") from None
    except (pickle.UnpicklingError, ImportError, AttributeError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"{path} cannot be read by geobench {geobench.__version__}'s loader ({type(err).__name__}: "
                        f"{err}); restore it from the GEO-Bench download or convert the task again") from None


def partition_file(task_dir: Path, partition: str) -> Path:
    """``<partition>_partition.json`` of a task; a symlink whose target is gone (geobench links
    ``default_partition.json`` by the path the converter wrote to) is refused naming the target."""
    path = Path(task_dir) / f"{partition}_partition.json"
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        local = Path(task_dir) / Path(target).name
        fix = f"ln -sf {local.name} {path}" if local.is_file() else "restore it from the GEO-Bench download"
        raise UserError(f"{path} is a symlink to {target}, which does not exist; {fix}")
    return path


def label_problem(label: np.ndarray, kind: str, num_classes: int) -> str | None:
    """What is wrong with a label for ``num_classes`` classes of ``kind``, or None."""
    values = np.asarray(label)
    if kind == "multi_label_classification":
        bad = values[(values != 0) & (values != 1)]
        return f"label vector value {bad.flat[0]!r}, not 0 or 1" if bad.size else None
    bad = values[(values < 0) | (values >= num_classes)]
    if not bad.size:
        return None
    shown = sorted(set(np.unique(bad).tolist()))
    return (f"label {'values' if len(shown) > 1 else 'value'} {', '.join(map(str, shown[:5]))} "
            f"outside classes 0..{num_classes - 1}")


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
        load_task_specs(source.task_dir)  # a one-line error here, not a traceback from the first sample
        partition_file(source.task_dir, source.partition)
        _import_geobench(source.root)
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
        raw = self._label(sample)
        problem = label_problem(raw, self.source.kind, self.source.num_classes)
        # Reported by the process that runs the extraction (``label_error``), so that a loader
        # worker's failure still reaches the user as one line.
        return {
            "image": to_model_input(rgb, self.source.band_scale, self.source.img_size),
            "label": raw if self.source.kind == "classification" else raw.astype(np.uint8),
            "label_error": problem and f"{self.source.task_dir}: sample {sample.sample_name} has {problem} "
                                      f"(num_classes {self.source.num_classes}); fix num_classes in the task file",
            "name": sample.sample_name,
            "index": index,
        }

    def _label(self, sample) -> np.ndarray:
        label = sample.label
        kind = self.source.kind
        if kind == "segmentation":
            if not hasattr(label, "data"):
                raise UserError(f"{self.source.task_dir}: task is segmentation but {sample.sample_name} has no label map")
            return np.asarray(label.data)
        if kind == "multi_label_classification":
            vector = np.asarray(label).reshape(-1)
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
            **({"class_names": list(self.source.class_names)} if self.source.class_names else {}),
        }


def collate(batch: list[dict]) -> dict:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": np.stack([b["label"] for b in batch]),
        "label_error": [b["label_error"] for b in batch],
        "name": [b["name"] for b in batch],
        "index": [b["index"] for b in batch],
    }
