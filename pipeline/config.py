"""Experiment configs in the reference's YAML layout, validated up front.

An experiment file (``configs/*_exp.yaml``) lists ``base:`` files relative to its own folder
(``_base_/diffusionsat.yaml``, ``tasks/meurosat.yaml``, ...); they are merged in order and the
experiment's own keys win, then ``--set`` overrides. A later value replaces an earlier one whole,
dicts included: ``layer_idxs: {up_blocks: {attn1: all}}`` selects the attn1 layers only, however
many the base file named (merging it into the base's would quietly keep them all). Every key the
reference reads is accepted with its default, so a reference experiment file runs unchanged; our
own keys are marked below. Unknown keys and bad values are refused with the file, the key, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from .backbone import layer_spec
from .errors import UserError

TASK_KINDS = ("classification", "multi_label_classification", "segmentation")
SPLITS = ("train", "val", "test")


class ConfigError(UserError):
    """A config that cannot be used; the message says which key and what is allowed."""


# ---- value checks: each returns None or the text of what is allowed ---------------------------


def _int(lo=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            return f"an integer >= {lo}" if lo is not None else "an integer"

    return check


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "a number"


def _positive(v):
    if _number(v) or v <= 0:
        return "a number > 0"


def _bool(v):
    if not isinstance(v, bool):
        return "true or false"


def _str(v):
    if not isinstance(v, str):
        return "a string"


def _choice(*allowed):
    def check(v):
        if v not in allowed:
            return "one of " + ", ".join(map(str, allowed))

    return check


def _optional(inner):
    def check(v):
        return None if v is None else inner(v)

    return check


def _list_of(inner, what: str, length=None, nonempty=False):
    want = f"a list of {length} {what}" if length else f"a {'non-empty ' if nonempty else ''}list of {what}"

    def check(v):
        if not isinstance(v, (list, tuple)) or (length and len(v) != length) or (nonempty and not v):
            return want
        if any(inner(x) for x in v):
            return want

    return check


# The resampling factors the segmentation head's neck knows (heads.rescale).
RESCALES = (4, 2, 1, 0.5, 0.25)


def _rescales(v):
    if not isinstance(v, (list, tuple)) or not v or any(isinstance(f, bool) or f not in RESCALES for f in v):
        return f"a non-empty list of factors from {', '.join(map(str, RESCALES))}, one per scale, widest first"


def _fraction(v):
    if _number(v) or not 0 < v <= 1:
        return "a number in (0, 1]: the fraction of the training images to train on"


def _unique_labels(v):
    inner = _list_of(_int(0), "integers >= 0", nonempty=True)(v)
    if inner or len(set(v)) != len(v):
        return "a non-empty list of distinct integers >= 0"


def _device(v):
    from .device import device_problem

    return device_problem(v)


def _metadata(v):
    if not isinstance(v, (list, tuple)) or any(_number(x) or not 0 <= x <= 1000 for x in v):
        return "a list of numbers in [0, 1000] (DiffusionSat's normalised metadata)"


def _tiers(v):
    from .cache.layout import tiers_problem

    if tiers_problem(v):
        return "a non-empty list of distinct tiers from maps, pooled, trajectory"


def _map_encoding(v):
    from .cache.layout import map_encoding_problem

    if map_encoding_problem(v):
        return "float16 (exact), bitround-K (K = 1..9 mantissa bits kept) or uint8"


def _field(default, check, ours=False):
    kw = {"default_factory": (lambda: copy.deepcopy(default))} if isinstance(default, (dict, list)) else {"default": default}
    return field(metadata={"check": check, "ours": ours}, **kw)


@dataclass(frozen=True)
class Config:
    # --- backbone (_base_/diffusionsat.yaml) ---
    pretrained_model_name_or_path: str = _field("models/diffusionsat", _str)
    num_metadata: int = _field(0, _int(0))
    use_metadata: bool = _field(False, _bool)
    low_cpu_mem_usage: bool = _field(False, _bool)
    revision: str | None = _field(None, _optional(_str))
    resolution_subfolder: str | None = _field(None, _optional(_str), ours=True)
    unet_subfolder: str = _field("checkpoint-150000/unet", _str, ours=True)
    metadata: list | None = _field(None, _optional(_metadata), ours=True)
    # --- extraction (_base_/satdifuser.yaml) ---
    fuser: str = _field("gw", _choice("gw", "lw", "moe"))
    layer_idxs: dict = _field(layer_spec.DEFAULT_LAYER_IDXS, layer_spec.check)
    projection_dim: int = _field(384, _int(1))
    save_timesteps: list = _field([47, 45, 40], _unique_labels)
    num_timesteps: int = _field(50, _int(1))
    diffusion_mode: str = _field("inversion", _choice("inversion", "generation"))
    num_experts: int = _field(8, _int(1))
    top_k: int = _field(2, _int(1))
    moe_warmup_steps: int | None = _field(None, _optional(_int(0)), ours=True)
    moe_balance_weight: float = _field(0.0, _number, ours=True)
    lw_input: str = _field("paper", _choice("paper", "reference"), ours=True)
    latent: str = _field("sample", _choice("sample", "mean"), ours=True)
    autocast: str = _field("fp16", _choice("fp16", "bf16", "none"), ours=True)
    extract_batch_size: int = _field(32, _int(1), ours=True)
    # --- UPerNet (_base_/upernet.yaml) ---
    rescales: list = _field([1, 1, 1, 1], _rescales)
    pool_scales: list = _field([1, 2, 3, 6], _list_of(_int(1), "integers >= 1"))
    channels: int = _field(512, _int(1))
    # --- task (tasks/*.yaml) ---
    dataset_name: str = _field("", _str)
    task: str = _field("classification", _choice(*TASK_KINDS))
    num_classes: int = _field(2, _int(1))
    original_img_size: int = _field(64, _int(1))
    img_size: int = _field(256, _int(8))
    num_channels: int = _field(3, _choice(3))
    class_list: list | None = _field(None, _optional(_list_of(_str, "strings")))
    class_names: list | None = _field(None, _optional(_list_of(_str, "strings")))
    prompt: str = _field("A satellite image", _str)
    negative_prompt: str = _field("", _str)
    resize_outputs: int = _field(-1, _int())
    ignore_index: int = _field(-100, _int())
    geobench_dir: str | None = _field(None, _optional(_str), ours=True)
    geobench_task: str | None = _field(None, _optional(_str), ours=True)
    bands: list | None = _field(None, _optional(_list_of(_str, "band names", length=3)), ours=True)
    band_scale: float | None = _field(None, _optional(_positive), ours=True)
    partition: str = _field("default", _str, ours=True)
    # The GEO-Bench partition whose training samples a fit trains on, found by name in the train cache.
    train_partition: str = _field("default", _str, ours=True)
    # --- experiment (*_exp.yaml) ---
    lr: float = _field(0.01, _number)
    op_weight_decay: float = _field(0.0, _number)
    warmup_epochs: int = _field(5, _int(0))
    min_lr: float = _field(1e-5, _number)
    batch_size: int = _field(32, _int(1))
    val_batch_size: int = _field(32, _int(1))
    num_workers: int = _field(4, _int(0))
    early_stopping_patience: int = _field(10, _int(1))
    max_train_epochs: int = _field(40, _int(1))
    eval_every_n_steps: int | None = _field(None, _optional(_int(1)))
    report_to: str = _field("none", _choice("wandb", "tensorboard", "none"))
    wandb_project: str = _field("satdifuser", _str)
    seed: int = _field(42, _int(0))
    exp_folder: str = _field("experiments", _str)
    device: str = _field("cuda", _device)
    limited_label: float | None = _field(None, _optional(_fraction))
    resume_from: str | None = _field(None, _optional(_str))
    cache_dir: str = _field("cache", _str, ours=True)
    preload_max_gb: float = _field(4.0, _number, ours=True)
    # Recompute the projections' activations in the backward pass instead of keeping them.
    checkpoint_projections: bool = _field(False, _bool, ours=True)
    shuffle_buffer_shards: int = _field(0, _int(0), ours=True)
    shard_size: int = _field(64, _int(1), ours=True)
    codec: str = _field("blosc-lz4", _choice("blosc-lz4", "blosc-zstd", "zstd", "none"), ours=True)
    # What extraction stores (cache.layout.TIERS) and how it encodes the maps.
    store: list = _field(["maps", "pooled", "trajectory"], _tiers, ours=True)
    map_encoding: str = _field("float16", _map_encoding, ours=True)
    # Where a fit takes its features: the stored maps, maps recomputed from the stored trajectory,
    # or the images through the whole backbone; None: maps when the cache holds them, else trajectory.
    source: str | None = _field(None, _optional(_choice("maps", "trajectory", "live")), ours=True)
    # Where this config was read from; set by load_config.
    config_file: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def output_shape(self) -> tuple[int, int] | None:
        """(H, W) of a segmentation task's label maps, which its head outputs; None for the other tasks."""
        return (self.original_img_size, self.original_img_size) if self.task == "segmentation" else None

    def cache_path(self, split: str) -> str:
        """``<cache_dir>/<dataset_name>/<split>.zarr``, or a URL when cache_dir is one."""
        return f"{self.cache_dir.rstrip('/')}/{self.dataset_name}/{split}.zarr"


def _check_consistency(cfg: Config, origin: dict) -> None:
    """Rules across keys; each error names the file that set the key at fault."""

    def fail(key: str, text: str):
        raise ConfigError(f"{origin.get(key, cfg.config_file)}: {text}")

    if not cfg.dataset_name:
        fail("dataset_name", "dataset_name is empty; set it in the task file (e.g. tasks/meurosat.yaml)")
    if cfg.use_metadata and cfg.num_metadata < 1:
        fail("num_metadata", f"use_metadata is true but num_metadata is {cfg.num_metadata}; set num_metadata: 7")
    if cfg.metadata is not None and len(cfg.metadata) != cfg.num_metadata:
        fail("metadata", f"metadata has {len(cfg.metadata)} values but num_metadata is {cfg.num_metadata}")
    if any(s >= cfg.num_timesteps for s in cfg.save_timesteps):
        fail("save_timesteps", f"save_timesteps {cfg.save_timesteps} has labels >= num_timesteps "
             f"{cfg.num_timesteps}; labels run from 0 to {cfg.num_timesteps - 1}")
    if cfg.img_size % 8:
        fail("img_size", f"img_size {cfg.img_size} is not a multiple of 8 (the VAE downsamples by 8)")
    if cfg.top_k > cfg.num_experts:
        fail("top_k", f"top_k {cfg.top_k} is larger than num_experts {cfg.num_experts}")
    if cfg.negative_prompt:
        fail("negative_prompt", f"negative_prompt {cfg.negative_prompt!r} has no effect on feature extraction (the "
             "reference encodes it but extracts without guidance); remove it")
    if cfg.resize_outputs > 0:
        fail("resize_outputs", f"resize_outputs is {cfg.resize_outputs}; only values <= 0 (maps kept at their sizes) "
             "work: the reference's fusers cannot be built on resized outputs; set resize_outputs: -1")
    if cfg.limited_label is not None and cfg.train_partition != cfg.partition:
        fail("limited_label", f"limited_label {cfg.limited_label} and train_partition {cfg.train_partition!r} both choose "
             "the training images; set one of them (train_partition for GEO-Bench's fixed subsets)")
    if cfg.task != "segmentation" and any(f != 1 for f in cfg.rescales):
        fail("rescales", f"rescales {cfg.rescales} only applies to the UPerNet head of segmentation tasks and task is "
             f"{cfg.task}; set rescales: [1, 1, 1, 1]")
    if cfg.projection_dim % 128:
        fail("projection_dim", f"projection_dim {cfg.projection_dim} is not a multiple of 128 (its quarter "
             "feeds GroupNorm(32))")


CONFIG_KEYS = {f.name: f for f in fields(Config) if not f.metadata.get("internal")}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def _load_raw(path: Path, seen: tuple = ()) -> tuple[dict, dict]:
    """Merged values and, for each key, the file that set it."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through base:")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: base must be a list of files relative to {path.parent}")
    merged, origin = {}, {}
    for base in bases:
        base_values, base_origin = _load_raw(path.parent / str(base), seen + (path.resolve(),))
        merged.update(base_values)
        origin.update(base_origin)
    merged.update(data)
    origin.update({key: str(path) for key in data})
    return merged, origin


def _validate(values: dict, origin: dict) -> None:
    for key, value in values.items():
        where = origin[key]
        if key not in CONFIG_KEYS:
            near = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else "; see README for the accepted keys"
            raise ConfigError(f"{where}: unknown key {key!r} (value {value!r}){hint}")
        allowed = CONFIG_KEYS[key].metadata["check"](value)
        if allowed:
            raise ConfigError(f"{where}: {key} is {value!r}; expected {allowed}")


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read, merge and validate an experiment config; ``overrides`` win over every file."""
    values, origin = _load_raw(Path(path))
    values.update(overrides or {})
    origin.update({key: "--set override" for key in overrides or {}})
    _validate(values, origin)
    cfg = Config(**values, config_file=str(path))
    _check_consistency(cfg, origin)
    return cfg


def default_value(name: str):
    f = CONFIG_KEYS[name]
    return f.default_factory() if f.default is MISSING else f.default


def geobench_root(cfg: Config) -> Path:
    """The GEO-Bench root: geobench_dir from the config, else $GEO_BENCH_DIR."""
    root = cfg.geobench_dir or os.environ.get("GEO_BENCH_DIR")
    if not root:
        raise ConfigError(
            f"{cfg.config_file}: no GEO-Bench folder; set geobench_dir in the config or the GEO_BENCH_DIR variable"
        )
    return Path(root)
