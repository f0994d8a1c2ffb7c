"""What a cache will cost before anything is extracted: bytes per tier and map encoding, and UNet
passes per training image and epoch for each fit source (`satdifuser cache plan`); and the refusal
of an extraction that would not fit on its disk (``check_room``).

Nothing here loads weights: layer shapes come from one forward pass of the UNet built from its
config.json on the meta device, so planning a full-size cache costs about a second.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from ..backbone.schedule import Schedule, label_key
from ..errors import UserError
from .layout import BASE, EXACT_ENCODING, TIERS, ArraySpec, CachePlan, array_specs, ordered_tiers, tier_of
from .store import CacheError, is_url, open_root

# Raw bytes over stored chunk bytes (each chunk's codec header and crc32c included; metadata and
# shard indexes are counted exactly below), measured by bench/compression_factors.py: maps,
# pooled vectors and trajectory of 4 demo images through the tiny backbone at 64 px, the default
# 21 layers x 3 timesteps; label maps of the demo segmentation task's 20 training images. The same
# script at SD-2.1 size with random weights (2 images at 256 px) measured more for every entry
# (blosc-lz4: float16 1.326, bitround-5 2.261, bitround-7 1.762, uint8 1.018, pooled 1.146,
# trajectory 1.165), and trained UNet activations compress less than that (lz4 1.11, BitRound(7)
# 1.45, BitRound(5) 1.78, as measured before on real activations). The tiny backbone's are the
# smallest of the three, so a plan of a full-size cache errs high (by about 19 % for random
# weights) rather than low; on the tiny demo caches it is within 5 % (tests/cache/test_planning.py).
COMPRESSION = {
    "blosc-lz4": {"float16": 1.076, "bitround-1": 2.615, "bitround-2": 2.252, "bitround-3": 1.986,
                  "bitround-4": 1.768, "bitround-5": 1.592, "bitround-6": 1.449, "bitround-7": 1.329,
                  "bitround-8": 1.228, "bitround-9": 1.142, "uint8": 0.974, "feature_scales": 1.175,
                  "pooled": 1.014, "trajectory": 1.093, "label_maps": 6.493},
    "blosc-zstd": {"float16": 1.044, "bitround-1": 2.971, "bitround-2": 2.444, "bitround-3": 1.909,
                   "bitround-4": 1.620, "bitround-5": 1.414, "bitround-6": 1.310, "bitround-7": 1.224,
                   "bitround-8": 1.152, "bitround-9": 1.095, "uint8": 0.974, "feature_scales": 1.259,
                   "pooled": 0.969, "trajectory": 1.081, "label_maps": 12.891},
    "zstd": {"float16": 1.033, "bitround-1": 2.435, "bitround-2": 2.038, "bitround-3": 1.777,
             "bitround-4": 1.572, "bitround-5": 1.417, "bitround-6": 1.309, "bitround-7": 1.214,
             "bitround-8": 1.141, "bitround-9": 1.085, "uint8": 0.995, "feature_scales": 1.241,
             "pooled": 0.969, "trajectory": 1.067, "label_maps": 11.966},
}
# Bit rounding shown by the plan besides float16 and uint8: the fewest mantissa bits whose relative
# L2 error stayed under 1 % on the real-size activations, and a closer one.
PLAN_BITROUND = (5, 7)
# Sample names are short (GEO-Bench's are 10-25 characters); when the task is not there to read them.
NAME_BYTES = 24
SHARD_INDEX_ENTRY = 16  # (offset, nbytes) per inner chunk of a shard, plus a crc32c per index


@dataclass(frozen=True)
class SplitPlan:
    """What one split's cache holds, for every tier and encoding the plan prices."""

    split: str
    plan: CachePlan  # all tiers, float16; variants are derived from it
    name_bytes: int  # mean length of a sample name, in bytes



def _factor(spec: ArraySpec, codec: str, encoding: str) -> float:
    if codec == "none":
        return 1.0
    table = COMPRESSION[codec]
    if spec.name.startswith("features/"):
        return table[encoding]
    if spec.name.startswith("feature_scales/"):
        return table["feature_scales"]
    if spec.name == "labels" and len(spec.shape) == 3:
        return table["label_maps"]
    return table.get(tier_of(spec.name), 1.0)  # class labels, names and done marks: raw, a bound


def _row_bytes(spec: ArraySpec, name_bytes: int) -> int:
    if spec.dtype == "str":
        return 4 + name_bytes  # vlen-utf8: a length, then the bytes
    return math.prod(spec.shape[1:]) * np.dtype(spec.dtype).itemsize


def data_bytes(spec: ArraySpec, plan: CachePlan, name_bytes: int = NAME_BYTES, rows: int | None = None) -> int:
    """Stored bytes of ``rows`` images (default all) of one array, its metadata left out.

    A sharded array stores one chunk per image and an index of ``shard_size`` entries per shard.
    An array chunked by shard stores its last chunk at full size, padded with zeros: the codecs
    pack that padding to nearly nothing, but without a codec it is stored as it is.
    """
    n = plan.num_samples if rows is None else rows
    shards = -(-n // plan.shard_size)
    stored_rows = shards * plan.shard_size if (plan.codec == "none" and spec.shards is None) else n
    payload = stored_rows * _row_bytes(spec, name_bytes) / _factor(spec, plan.codec, plan.map_encoding)
    index = shards * (spec.shards[0] * SHARD_INDEX_ENTRY + 4) if spec.shards else 0
    return round(payload + index)


def metadata_bytes(plan: CachePlan) -> dict[str, int]:
    """Exact bytes of each array's zarr.json, made by the writer's own code in memory."""
    import zarr
    from zarr.storage import MemoryStore

    from .writer import _create_arrays

    store = MemoryStore()
    _create_arrays(zarr.open_group(store, mode="w", zarr_format=3), plan)
    return {key.rsplit("/", 1)[0]: len(value.to_bytes()) for key, value in store._store_dict.items()
            if key.endswith("/zarr.json")}


def plan_bytes(plan: CachePlan, name_bytes: int = NAME_BYTES, rows: int | None = None,
               metadata: bool = True) -> dict[str, int]:
    """Bytes on disk of a cache of ``plan`` by tier (and ``BASE``), as `cache info` counts them."""
    meta = metadata_bytes(plan) if metadata else {}
    out = {tier: 0 for tier in (*plan.tiers, BASE)}
    for spec in array_specs(plan):
        out[tier_of(spec.name)] += data_bytes(spec, plan, name_bytes, rows) + meta.get(spec.name, 0)
    return out


def stored_objects(plan: CachePlan, shards: int) -> int:
    """Files ``shards`` shards of ``plan`` write: one per array and shard, and each array's zarr.json."""
    return len(array_specs(plan)) * (shards + 1)


# ---- the inputs of a plan: layer shapes (meta device), split sizes, passes ---------------------


def layer_shapes(cfg) -> dict:
    """(C, H, W) of every layer ``cfg.layer_idxs`` selects at ``cfg.img_size``, without weights."""
    import torch

    from ..backbone.layers import select_layers
    from ..backbone.loader import read_model_configs
    from ..backbone.sat_unet import SatUNet
    from ..extract.extractor import layer_shapes as traced_shapes
    from ..extract.run import backbone_spec

    unet_config, _ = read_model_configs(backbone_spec(cfg))
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    config["use_metadata"] = False  # the metadata MLPs change no shape
    try:
        with torch.device("meta"):
            unet = SatUNet.from_config(config)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{cfg.pretrained_model_name_or_path}: the UNet config.json does not build a UNet "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    return traced_shapes(unet, select_layers(unet, cfg.layer_idxs), cfg.img_size // 8,
                         unet.config.cross_attention_dim, "meta")


def passes_per_epoch(cfg) -> dict[str, int]:
    """UNet passes per training image and epoch for each fit source, and the live source's VAE passes."""
    from ..backbone.loader import read_model_configs
    from ..extract.run import backbone_spec

    _, scheduler = read_model_configs(backbone_spec(cfg))
    schedule = Schedule.build(scheduler, cfg.num_timesteps, cfg.save_timesteps, cfg.diffusion_mode)
    return {"maps": 0, "trajectory": len(set(cfg.save_timesteps)), "live": schedule.unet_passes, "live_vae": 1}


def _config_label_shape(cfg) -> tuple[tuple, str]:
    if cfg.task == "segmentation":
        return cfg.output_shape, "uint8"
    if cfg.task == "multi_label_classification":
        return (cfg.num_classes,), "uint8"
    return (), "int64"


def cache_plan(cfg, num_samples: int, shapes: dict, label: tuple[tuple, str]) -> CachePlan:
    """The plan extraction would write for ``cfg`` (all tiers, float16; see ``variant``)."""
    latent = cfg.img_size // 8
    return CachePlan(num_samples=num_samples, shard_size=cfg.shard_size,
                     timesteps=tuple(label_key(s) for s in cfg.save_timesteps), layer_shapes=shapes,
                     latent_shape=(4, latent, latent), label_shape=tuple(label[0]), label_dtype=label[1],
                     codec=cfg.codec)


def variant(plan: CachePlan, tiers, encoding: str = EXACT_ENCODING) -> CachePlan:
    from dataclasses import replace

    return replace(plan, tiers=ordered_tiers(tiers), map_encoding=encoding)


def split_plans(cfg, images: int | None) -> tuple[list[SplitPlan], str]:
    """One plan per split, and where its image counts come from: ``images`` per split when given,
    else the GEO-Bench task (its first sample gives the label's shape)."""
    from ..config import SPLITS

    shapes = layer_shapes(cfg)
    if images is not None:
        if images < 1:
            raise UserError(f"--images {images}: expected a number of images per split >= 1")
        plan = cache_plan(cfg, images, shapes, _config_label_shape(cfg))
        return [SplitPlan(s, plan, NAME_BYTES) for s in SPLITS], f"--images {images} per split"
    from ..data.geobench_task import GeoBenchSplit, TaskSource

    source = TaskSource.from_config(cfg)
    if not (source.task_dir / "task_specs.pkl").is_file():
        raise UserError(f"{cfg.config_file}: GEO-Bench task not found in {source.task_dir} (no task_specs.pkl), so "
                        "its split sizes are unknown; pass --images N to plan N images per split, or set "
                        "geobench_dir to the folder holding it")
    out = []
    for split in SPLITS:
        dataset = GeoBenchSplit(source, split)
        out.append(dataset_plan(cfg, dataset, shapes))
    return out, f"GEO-Bench task {source.task_dir}"


def dataset_plan(cfg, dataset, shapes: dict | None = None) -> SplitPlan:
    """The plan of one split read from its dataset (its size, label shape and names)."""
    label = _config_label_shape(cfg)
    if len(dataset):
        first = np.asarray(dataset[0]["label"])
        label = (tuple(first.shape), str(first.dtype))
    names = round(np.mean([len(n.encode()) for n in dataset.names])) if len(dataset) else NAME_BYTES
    return SplitPlan(dataset.split, cache_plan(cfg, len(dataset), shapes or layer_shapes(cfg), label), names)


# ---- the plan as a table ----------------------------------------------------------------------


def encodings(cfg) -> list[str]:
    names = [EXACT_ENCODING] + [f"bitround-{k}" for k in PLAN_BITROUND] + ["uint8"]
    return names + ([cfg.map_encoding] if cfg.map_encoding not in names else [])


def plan_report(cfg, images: int | None = None) -> dict:
    """Bytes per image and per split for every tier and map encoding, the config's own store, and
    UNet passes per training image and epoch for each fit source."""
    splits, counted_from = split_plans(cfg, images)
    rows = []

    def row(tier: str, encoding: str | None, tiers, enc: str):
        per_split = {}
        for sp in splits:
            per_split[sp.split] = plan_bytes(variant(sp.plan, tiers, enc), sp.name_bytes)[tier]
        per_split["total"] = sum(per_split.values())
        n = sum(sp.plan.num_samples for sp in splits)
        rows.append({"tier": tier, "encoding": encoding, "bytes_per_image": round(per_split["total"] / n),
                     "bytes": per_split})

    for enc in encodings(cfg):
        row("maps", enc, ["maps"], enc)
    row("pooled", None, ["pooled"], EXACT_ENCODING)
    row("trajectory", None, ["trajectory"], EXACT_ENCODING)
    row(BASE, None, ["pooled"], EXACT_ENCODING)
    store = {}
    for sp in splits:
        store[sp.split] = sum(plan_bytes(variant(sp.plan, cfg.store, cfg.map_encoding), sp.name_bytes).values())
    store["total"] = sum(store.values())
    first = splits[0].plan
    return {
        "config": cfg.config_file, "dataset": cfg.dataset_name, "img_size": cfg.img_size,
        "layers": {k: list(v) for k, v in first.layer_shapes.items()}, "timesteps": list(first.timesteps),
        "codec": cfg.codec, "shard_size": cfg.shard_size, "images_from": counted_from,
        "images": {sp.split: sp.plan.num_samples for sp in splits},
        "rows": rows,
        "store": {"tiers": list(ordered_tiers(cfg.store)), "map_encoding": cfg.map_encoding, "bytes": store},
        "unet_passes_per_image_and_epoch": passes_per_epoch(cfg),
    }


def human(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_plan(report: dict) -> str:
    splits = list(report["images"])
    counts = ", ".join(f"{s} {n}" for s, n in report["images"].items())
    lines = [
        f"plan         {report['config']}: {report['dataset']} at {report['img_size']} px, "
        f"{len(report['layers'])} layers x {len(report['timesteps'])} timesteps, codec {report['codec']}, "
        f"shards of {report['shard_size']}",
        f"images       {counts} (from {report['images_from']})",
        f"{'tier':<13}{'encoding':<12}{'per image':>11}" + "".join(f"{s:>11}" for s in splits) + f"{'total':>11}",
    ]
    for r in report["rows"]:
        name = "labels etc." if r["tier"] == BASE else r["tier"]
        lines.append(f"{name:<13}{r['encoding'] or '-':<12}{human(r['bytes_per_image']):>11}"
                     + "".join(f"{human(r['bytes'][s]):>11}" for s in splits) + f"{human(r['bytes']['total']):>11}")
    store = report["store"]
    lines.append(f"store        [{', '.join(store['tiers'])}], map_encoding {store['map_encoding']} (the config's): "
                 + ", ".join(f"{s} {human(store['bytes'][s])}" for s in splits) + f"; total {human(store['bytes']['total'])}")
    p = report["unet_passes_per_image_and_epoch"]
    lines.append(f"fit cost     UNet passes per training image and epoch: source maps {p['maps']}, trajectory "
                 f"{p['trajectory']}, live {p['live']} (+{p['live_vae']} VAE)")
    return "\n".join(lines)


# ---- the room an extraction needs -------------------------------------------------------------

# Kept free beyond the estimate: the compression factors are averages over random-weight
# activations and a trained UNet's compress a few percent differently (the tiny and full-size
# backbones differ by up to 7 %), and every stored object occupies whole filesystem blocks, which
# dominates for small arrays.
ROOM_MARGIN = 0.05
BLOCK = 4096


def free_bytes(path: str) -> tuple[int, str]:
    """Free bytes on the filesystem that would hold ``path``, and the existing folder asked."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free, folder


def pending_shards(path: str, plan: CachePlan) -> list[int]:
    """Shards of ``plan`` not yet marked done in the store at ``path`` (all when there is none)."""
    everything = list(range(plan.num_shards))
    if not os.path.exists(path):
        return everything
    try:
        done = np.asarray(open_root(path, "r")["done"][:], dtype=bool)
    except Exception:  # not a cache, or an unreadable one: extraction writes it whole
        return everything
    if len(done) != plan.num_samples:
        return everything
    return [s for s in everything if not done[slice(*plan.shard_range(s))].all()]


def room_needed(plan: CachePlan, shards: list[int], name_bytes: int, fresh: bool) -> int:
    """Bytes (with the margin) that writing ``shards`` of ``plan`` takes; ``fresh``: a new store."""
    rows = sum(b - a for a, b in map(plan.shard_range, shards))
    needed = sum(plan_bytes(plan, name_bytes, rows, metadata=fresh).values())
    return round(needed * (1 + ROOM_MARGIN)) + stored_objects(plan, len(shards)) * BLOCK


def _fitting_stores(plan: CachePlan, shards, name_bytes: int, fresh: bool, free: int) -> list[tuple]:
    """The largest tier sets (fewer tiers of those asked) and lighter encodings that would fit."""
    fits = []
    for size in range(len(plan.tiers) - 1, 0, -1):
        for tiers in combinations(plan.tiers, size):
            if any(set(tiers) < set(f[0]) for f in fits):
                continue
            needed = room_needed(variant(plan, tiers, plan.map_encoding), shards, name_bytes, fresh)
            if needed <= free:
                fits.append((tiers, plan.map_encoding, needed))
    if plan.holds("maps"):
        for enc in ("uint8", f"bitround-{PLAN_BITROUND[0]}"):
            if enc != plan.map_encoding:
                needed = room_needed(variant(plan, plan.tiers, enc), shards, name_bytes, fresh)
                if needed <= free:
                    fits.append((plan.tiers, enc, needed))
    return fits


def check_room(cfg, path: str, dataset, replace: bool = False) -> None:
    """Refuse, before the backbone is loaded and anything is written, an extraction of ``dataset``
    into the local ``path`` that its filesystem has no room for: one line with the bytes needed,
    the bytes free and the smaller stores that would fit. ``replace``: the store at ``path`` is
    rebuilt whole (its bytes count as free). Object-store URLs are not checked: their room is
    not known from here (a ``file://`` URL is checked as the folder it names)."""
    if is_url(path) and not str(path).startswith("file://"):
        return
    local = str(path).removeprefix("file://")
    split = dataset_plan(cfg, dataset)
    plan = variant(split.plan, cfg.store, cfg.map_encoding)
    shards = list(range(plan.num_shards)) if replace else pending_shards(local, plan)
    if not shards:
        return
    fresh = replace or len(shards) == plan.num_shards
    needed = room_needed(plan, shards, split.name_bytes, fresh)
    free, folder = free_bytes(local)
    if replace and os.path.isdir(local):
        free += sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(local) for f in files)
    if needed <= free:
        return
    store = f"store [{', '.join(plan.tiers)}]" + (f", map_encoding {plan.map_encoding}" if plan.holds("maps") else "")
    fits = _fitting_stores(plan, shards, split.name_bytes, fresh, free)
    if fits:
        options = "; ".join(
            f"store [{', '.join(t)}]" + (f", map_encoding {e}" if "maps" in t and e != plan.map_encoding else "")
            + f" needs {human(n)} and would fit" for t, e, n in fits)
    else:
        options = f"no store of fewer tiers ({', '.join(TIERS)}) would fit either"
    raise CacheError(f"cache {path}: {store} needs {human(needed)} for {len(shards)} shard(s) of {plan.num_samples} "
                     f"images ({ROOM_MARGIN:.0%} margin included) but {folder} has {human(free)} free; {options}; "
                     "free space, set cache_dir elsewhere or choose the store (--set store=[...])")
