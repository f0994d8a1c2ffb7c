"""The Zarr v3 layout of a feature cache: the contract between extraction and every reader.

::

    <split>.zarr/
      attrs["satdifuser"]      provenance (format, backbone fingerprint, extraction, dataset)
      features/<tNN>/<layer>   (N, C, H, W) float16, one chunk per image, sharded along N  [maps]
                               (uint8 under map_encoding uint8: x = offset + scale * q)
      feature_scales/<tNN>/<layer>  (N, C, 2) float32 (offset, scale) per image and channel [maps, uint8]
      pooled/<tNN>/<layer>     (N, C) float32, spatial mean                               [pooled]
      trajectory/<tNN>         (N, 4, h, w) float32, the UNet input x_t of that label's pass [trajectory]
      latents                  (N, 4, h, w) float32                                       [trajectory]
      labels                   (N,) int64 | (N, K) uint8 | (N, H, W) uint8
      sample_names             (N,) str (Zarr v3 ``string``, vlen-utf8)
      done                     (N,) bool, written last for each shard

Every array carries Zarr v3 ``dimension_names`` (``ArraySpec.dims``) and short attributes, so that
xarray and dask open the store without this code. A dimension name has one size in the whole
store: xarray refuses a group whose arrays give one name two sizes, and the layers of one timestep
differ in channels and grid, so channel and grid dimensions are named with their size
(``channel_1280``, ``y_16``, ``x_16``): every grid of 16 rows covers the image at the same
resolution, whichever array it belongs to.

A cache holds the arrays of the tiers its plan names (``TIERS``; all three by default), and always
labels, sample names and done marks.

A unit of work is one shard of ``shard_size`` images; every array is chunked so that a unit
touches whole shards only, and ``done`` has one chunk per unit, so marking it is one atomic
write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import zarr.codecs as zc

FORMAT_VERSION = 1
ATTRS_KEY = "satdifuser"
# Set in a store's root attributes, instead of the provenance, while it is created or replaced.
CREATING_KEY = "satdifuser_creating"

# Lossless codecs on inner chunks; crc32c lets `cache verify` catch corrupted bytes.
CODECS = {
    "blosc-zstd": lambda: [zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc-lz4": lambda: [zc.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "zstd": lambda: [zc.ZstdCodec(level=1)],
    "none": lambda: [],
}


def compressors(name: str) -> list:
    if name not in CODECS:
        raise ValueError(f"codec {name!r} is not one of {list(CODECS)}")
    return CODECS[name]() + [zc.Crc32cCodec()]


# What a cache can hold, chosen at extraction (config key ``store``).
TIERS = ("maps", "pooled", "trajectory")
# How feature maps are stored (config key ``map_encoding``): exact float16; float16 with only the
# K leading mantissa bits kept (the rest zeroed, so the lossless codec packs them); or uint8 with
# a per-image, per-channel affine (offset, scale) in ``feature_scales``. All are plain Zarr dtypes.
BITROUND = re.compile(r"^bitround-(\d+)$")
EXACT_ENCODING = "float16"


def map_encoding_problem(name) -> str | None:
    """Why ``name`` is not a map encoding, or None when it is one."""
    if name in (EXACT_ENCODING, "uint8"):
        return None
    match = BITROUND.match(str(name))
    if match and 1 <= int(match.group(1)) <= 9:
        return None
    return f"map_encoding {name!r} is not float16 (exact), bitround-K (K = 1..9 mantissa bits kept) or uint8"


def tiers_problem(tiers) -> str | None:
    """Why ``tiers`` is not a list of tiers, or None when it is one."""
    if not isinstance(tiers, (list, tuple)) or not tiers or any(t not in TIERS for t in tiers) \
            or len(set(tiers)) != len(tiers):
        return f"store {tiers!r} is not a non-empty list of distinct tiers from {list(TIERS)}"
    return None


# Labels, sample names and done marks: in every cache, whatever its tiers.
BASE = "labels"


def tier_of(name: str) -> str:
    """The tier an array of the layout belongs to (``BASE`` for those every cache holds)."""
    if name.startswith(("features/", "feature_scales/")):
        return "maps"
    if name.startswith("pooled/"):
        return "pooled"
    if name.startswith("trajectory/") or name == "latents":
        return "trajectory"
    return BASE


def ordered_tiers(tiers) -> tuple[str, ...]:
    return tuple(t for t in TIERS if t in tiers)


def feature_path(label_key: str, layer: str) -> str:
    return f"features/{label_key}/{layer}"


def feature_scale_path(label_key: str, layer: str) -> str:
    return f"feature_scales/{label_key}/{layer}"


def pooled_path(label_key: str, layer: str) -> str:
    return f"pooled/{label_key}/{layer}"


def trajectory_path(label_key: str) -> str:
    return f"trajectory/{label_key}"


@dataclass(frozen=True)
class CachePlan:
    """Shapes of everything a cache holds; derived from the backbone, settings and dataset."""

    num_samples: int
    shard_size: int
    timesteps: tuple[str, ...]  # label keys, e.g. ("t47", "t45", "t40")
    layer_shapes: dict  # layer -> (C, H, W)
    latent_shape: tuple[int, int, int]
    label_shape: tuple[int, ...]  # per sample: () | (K,) | (H, W)
    label_dtype: str
    codec: str = "blosc-lz4"
    tiers: tuple[str, ...] = TIERS
    map_encoding: str = EXACT_ENCODING

    def holds(self, tier: str) -> bool:
        return tier in self.tiers

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def to_attrs(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            "timesteps": list(self.timesteps),
            "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            "latent_shape": list(self.latent_shape),
            "label_shape": list(self.label_shape),
            "label_dtype": self.label_dtype,
            "codec": self.codec,
            "tiers": list(self.tiers),
            "map_encoding": self.map_encoding,
        }

    @classmethod
    def from_attrs(cls, attrs) -> CachePlan:
        """The plan stored in a cache's attributes; ValueError naming the first key that is wrong."""
        if not isinstance(attrs, dict):
            raise ValueError("its plan is missing")
        try:
            plan = cls(
                attrs["num_samples"], attrs["shard_size"], tuple(attrs["timesteps"]),
                {k: tuple(v) for k, v in attrs["layer_shapes"].items()}, tuple(attrs["latent_shape"]),
                tuple(attrs["label_shape"]), attrs["label_dtype"], attrs["codec"],
                # Caches written before tiers existed hold all three, exactly.
                tuple(attrs.get("tiers", TIERS)), attrs.get("map_encoding", EXACT_ENCODING),
            )
        except KeyError as err:
            raise ValueError(f"its plan lacks {err.args[0]!r}") from None
        except (TypeError, AttributeError):
            raise ValueError("its plan is not a mapping of lists") from None
        plan._check()
        return plan

    def _check(self) -> None:
        def sizes(v, n=None):
            return isinstance(v, tuple) and (n is None or len(v) == n) and all(
                isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)

        checks = [
            ("num_samples", isinstance(self.num_samples, int) and 0 <= self.num_samples < 2**40),
            ("shard_size", isinstance(self.shard_size, int) and 0 < self.shard_size < 2**31),
            ("timesteps", all(isinstance(t, str) and t for t in self.timesteps) and self.timesteps),
            ("layer_shapes", all(isinstance(k, str) and sizes(v, 3) for k, v in self.layer_shapes.items())),
            ("latent_shape", sizes(self.latent_shape, 3)),
            ("label_shape", sizes(self.label_shape) and len(self.label_shape) <= 2),
            ("label_dtype", self.label_dtype in ("int64", "uint8", "int32", "int16", "bool")),
            ("codec", self.codec in CODECS),
            ("tiers", tiers_problem(self.tiers) is None and self.tiers == ordered_tiers(self.tiers)),
            ("map_encoding", map_encoding_problem(self.map_encoding) is None),
        ]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"its plan has an invalid {key} ({getattr(self, key)!r})")


@dataclass(frozen=True)
class ArraySpec:
    """One array of the layout: what the writer creates and every audit expects."""

    name: str
    shape: tuple  # (N, ...)
    chunks: tuple
    shards: tuple | None
    dtype: str
    description: str
    dims: tuple[str, ...] = ()  # Zarr v3 dimension_names, one per axis
    attrs: dict = field(default_factory=dict)  # what it holds beyond the description: long_name, label, layer

    @property
    def rows_per_file(self) -> int:
        """Rows in one stored object: one shard, whether sharded or chunked by shard."""
        return (self.shards or self.chunks)[0]


SAMPLE = "sample"
LATENT_CHANNEL = "latent_channel"


def channel_dim(channels: int) -> str:
    return f"channel_{channels}"


def grid_dims(height: int, width: int) -> tuple[str, str]:
    return f"y_{height}", f"x_{width}"


def label_dims(label_shape: tuple) -> tuple[str, ...]:
    """Class labels (), a vector over classes (K,), or a label map (H, W)."""
    if len(label_shape) == 2:
        return (SAMPLE, *grid_dims(*label_shape))
    return (SAMPLE, "class") if label_shape else (SAMPLE,)


def array_specs(plan: CachePlan) -> list[ArraySpec]:
    """Every array a cache of ``plan`` holds, ``done`` last: the one enumeration of the layout."""
    n, s = plan.num_samples, plan.shard_size
    latent_dims = (SAMPLE, LATENT_CHANNEL, *grid_dims(*plan.latent_shape[1:]))

    def per_shard(name, shape, dtype, what, dims, **attrs):
        return ArraySpec(name, (n, *shape), (s, *shape), None, dtype, what, dims, attrs)

    specs = []
    maps, uint8 = plan.holds("maps"), plan.map_encoding == "uint8"
    for t in plan.timesteps:
        for layer, shape in plan.layer_shapes.items():
            where = {"label": t, "layer": layer}
            channels = (SAMPLE, channel_dim(shape[0]))
            if maps:
                # One chunk per image so a batch reads only its images; shards keep file counts low.
                specs.append(ArraySpec(feature_path(t, layer), (n, *shape), (1, *shape), (s, *shape),
                                       "uint8" if uint8 else "float16",
                                       f"feature maps of {layer} at label {t}" + ("" if plan.map_encoding == EXACT_ENCODING
                                       else f", {plan.map_encoding}"), (*channels, *grid_dims(*shape[1:])),
                                       {"long_name": f"{layer} maps at {t}", **where}))
            if maps and uint8:
                specs.append(per_shard(feature_scale_path(t, layer), (shape[0], 2), "float32",
                                       f"(offset, scale) per channel of features/{t}/{layer}: x = offset + scale * q",
                                       (*channels, "offset_scale"), long_name=f"{layer} map scales at {t}", **where))
            if plan.holds("pooled"):
                specs.append(per_shard(pooled_path(t, layer), (shape[0],), "float32",
                                       f"spatial means of {layer} at label {t}", channels,
                                       long_name=f"{layer} pooled at {t}", **where))
        if plan.holds("trajectory"):
            specs.append(per_shard(trajectory_path(t), plan.latent_shape, "float32", f"UNet input x_t of label {t}",
                                   latent_dims, long_name=f"x_t at {t}", label=t))
    if plan.holds("trajectory"):
        specs.append(per_shard("latents", plan.latent_shape, "float32", "VAE latents, scaled", latent_dims,
                               long_name="VAE latents"))
    specs.append(per_shard("labels", plan.label_shape, plan.label_dtype, "labels", label_dims(plan.label_shape),
                           long_name="labels"))
    specs.append(ArraySpec("sample_names", (n,), (s,), None, "str", "sample names", (SAMPLE,),
                           {"long_name": "sample names"}))
    specs.append(done_spec("done", plan, "shards written in full"))
    return specs


def shard_arrays(plan: CachePlan, rows: dict, tiers=None) -> dict:
    """Rows of the arrays a write supplies, keyed by their paths, in the order of ``array_specs``.

    ``rows`` holds them by the first part of the path: ``features`` and ``pooled`` as
    {label: {layer: rows}}, ``trajectory`` as {label: rows}, ``latents``, ``labels`` and
    ``sample_names`` as rows. Every array of ``plan`` (of ``tiers`` only, when given) whose part
    ``rows`` has is taken, as a NumPy array; maps are exact: the writer encodes them and adds their
    ``feature_scales``. ``done`` is the writer's own.
    """
    out = {}
    for spec in array_specs(plan):
        part = spec.name.split("/")[0]
        if part not in rows or (tiers is not None and tier_of(spec.name) not in tiers):
            continue
        value = rows[part]
        if "label" in spec.attrs:
            value = value[spec.attrs["label"]]
        if "layer" in spec.attrs:
            value = value[spec.attrs["layer"]]
        out[spec.name] = np.asarray(value)
    return out


def done_spec(name: str, plan: CachePlan, what: str) -> ArraySpec:
    """Done marks, one chunk per shard so that marking a shard is one atomic write."""
    return ArraySpec(name, (plan.num_samples,), (plan.shard_size,), None, "bool", what, (SAMPLE,),
                     {"long_name": what})


def object_key(array, shard: int) -> str:
    """The store key of the object (shard file or chunk) that holds shard ``shard``'s rows."""
    return f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"
