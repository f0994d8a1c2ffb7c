"""Reading any subset of timesteps x layers from a cache, for a batch of indices."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

from .encoding import uint8_decode
from .layout import (
    ATTRS_KEY,
    CREATING_KEY,
    FORMAT_VERSION,
    TIERS,
    CachePlan,
    array_specs,
    feature_path,
    feature_scale_path,
    object_key,
    pooled_path,
    trajectory_path,
)
from .shards import ShardReader
from .store import CacheError, CacheMismatch, ChunkPresence, DamagedData, differences, open_root

# Feature maps of one batch are read an array per thread: file reads and blosc/zstd decoding
# release the GIL, so this scales with cores when maps are large. Below PARALLEL_BYTES per array
# the Python around each read dominates and threads only contend for the GIL (the demo's 4 KiB
# maps read 20 % slower with two threads than with one).
READ_THREADS = min(8, os.cpu_count() or 1)
PARALLEL_BYTES = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cache-read")
        return _pool


def _forget_pool() -> None:
    # A forked child (a DataLoader worker) inherits the pool but not its threads: start afresh.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def open_cache(path: str, storage_options: dict | None = None, expect: dict | None = None,
               direct_reads: bool = True) -> FeatureCache:
    """Open a cache read-only; with ``expect``, refuse one built for another request.

    ``expect`` is a partial request, e.g. ``{"backbone": {"id": ...}, "extraction": {...}}``:
    only the keys it names are compared. ``direct_reads`` reads feature maps of a local cache
    straight from its shard files (``shards.ShardReader``); off, every read goes through zarr.
    """
    try:
        root = open_root(path, "r", storage_options)
    except CacheError:
        raise
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}; run `satdifuser extract` first") from None
    except Exception as err:  # zarr raises several kinds for "not a group here"
        raise CacheError(f"no cache at {path} ({type(err).__name__}); run `satdifuser extract` first") from None
    attrs = root.attrs.get(ATTRS_KEY)
    if attrs is None:
        if root.attrs.get(CREATING_KEY):
            raise CacheError(f"cache {path} is being created or replaced and holds nothing yet; run `satdifuser "
                             "extract` to finish it")
        raise CacheError(f"{path} is a Zarr store but not a feature cache (no '{ATTRS_KEY}' attributes)")
    if not isinstance(attrs, dict) or attrs.get("format_version") != FORMAT_VERSION:
        version = attrs.get("format_version") if isinstance(attrs, dict) else None
        raise CacheError(
            f"cache {path} has format version {version}, this version reads "
            f"{FORMAT_VERSION}; rebuild it with `satdifuser extract --overwrite`"
        )
    cache = FeatureCache(root, path, attrs, direct_reads)
    if expect:
        cache.check(expect)
    return cache


def lacking_tiers(path: str, held, lacking, purpose: str) -> CacheError:
    """The error for tiers ``lacking`` from a cache holding ``held``, with the command that adds them:
    maps and pooled vectors come from a stored trajectory, anything else only from the images."""
    if set(lacking) <= {"maps", "pooled"} and "trajectory" in held:
        fix = (f"add {'it' if len(lacking) == 1 else 'them'} from the stored trajectory with `satdifuser extract "
               f"CONFIG --from-trajectory --store {','.join(lacking)}`")
    else:
        wanted = ",".join(t for t in TIERS if t in held or t in lacking)
        fix = f"re-extract with `satdifuser extract CONFIG --overwrite --store {wanted}`"
    return CacheError(f"cache {path} holds the tiers {list(held)}, not {', '.join(lacking)}, which {purpose} "
                      f"needs; {fix}")


def _subset(request: dict, expect: dict) -> dict:
    return {k: _subset(request.get(k, {}), v) if isinstance(v, dict) else request.get(k, "<absent>")
            for k, v in expect.items()}


class FeatureCache:
    def __init__(self, root, path: str, attrs: dict, direct_reads: bool = True):
        self.root = root
        self.path = path
        self.attrs = attrs
        try:
            self.plan = CachePlan.from_attrs(attrs.get("plan"))
            if not isinstance(attrs.get("request"), dict):
                raise ValueError("its request is missing")
        except ValueError as err:
            raise CacheError(f"cache {path} has damaged attributes: {err}; re-extract it with "
                             "`satdifuser extract --overwrite`") from None
        self.specs = {spec.name: spec for spec in array_specs(self.plan)}
        self.direct_reads = direct_reads
        self._arrays: dict = {}
        self._readers: dict[str, ShardReader | None] = {}
        self._present: set[tuple[str, int]] = set()
        self._presence: ChunkPresence | None = None
        self.array("done")  # its shape must agree with the plan before anything is trusted

    # --- what it holds -----------------------------------------------------------------------
    @property
    def request(self) -> dict:
        return self.attrs["request"]

    @property
    def timesteps(self) -> list[str]:
        return list(self.plan.timesteps)

    @property
    def layers(self) -> list[str]:
        return list(self.plan.layer_shapes)

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int, int]]:
        return dict(self.plan.layer_shapes)

    def __len__(self) -> int:
        return self.plan.num_samples

    def array(self, name: str):
        """The zarr array ``name``, refused when it is missing or shaped unlike the plan."""
        if name not in self._arrays:
            spec = self.specs.get(name)
            try:
                array = self.root[name]
            except KeyError:
                raise CacheError(f"cache {self.path} lacks its array {name}; run `satdifuser cache verify "
                                 f"{self.path}` and re-extract") from None
            if spec is not None and tuple(array.shape) != spec.shape:
                raise CacheError(f"cache {self.path}: array {name} has shape {tuple(array.shape)}, its attributes "
                                 f"say {spec.shape}; re-extract it with `satdifuser extract --overwrite`")
            self._arrays[name] = array
        return self._arrays[name]

    @cached_property
    def done(self) -> np.ndarray:
        """Done flags; a shard whose flags cannot be read counts as not done."""
        done = np.zeros(len(self), dtype=bool)
        for shard in range(self.plan.num_shards):
            rows = slice(*self.plan.shard_range(shard))
            try:
                done[rows] = self.array("done")[rows]
            except Exception:  # a damaged chunk: `cache verify` names it
                pass
        return done

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @cached_property
    def sample_names(self) -> list[str]:
        """Every row's name; rows not done yet have an empty one."""
        done = np.flatnonzero(self.done)
        names = [""] * len(self)
        for row, name in zip(done, self._read("sample_names", done)):
            names[row] = str(name)
        return names

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers this cache holds (``layout.TIERS``)."""
        return self.plan.tiers

    @property
    def map_encoding(self) -> str:
        return self.plan.map_encoding

    def require(self, tier: str, purpose: str) -> None:
        """Raise one line naming the tiers held and the command that adds ``tier`` when it is lacking."""
        if not self.plan.holds(tier):
            raise lacking_tiers(self.path, self.tiers, [tier], purpose)

    @property
    def layer_catalog(self) -> dict | None:
        """What the UNet has for the blocks and suffixes of the extraction's ``layer_idxs``
        (``layer_spec``); None for caches written before it was stored."""
        return self.attrs.get("layer_catalog")

    def check(self, expect: dict) -> None:
        """Raise CacheError naming both sides of every key of ``expect`` that differs."""
        diffs = differences(_subset(self.request, expect), expect)
        if diffs:
            raise CacheMismatch(self.path, diffs, "extract a cache for these settings")

    # --- reading -----------------------------------------------------------------------------
    def _select(self, timesteps, layers) -> tuple[list[str], list[str]]:
        timesteps = list(timesteps) if timesteps is not None else self.timesteps
        layers = list(layers) if layers is not None else self.layers
        for asked, held, what in ((timesteps, self.timesteps, "timesteps"), (layers, self.layers, "layers")):
            lacking = [x for x in asked if x not in held]
            if lacking:
                raise CacheError(f"cache {self.path} has no {what} {lacking}; it holds {held}")
        return timesteps, layers

    def _checked(self, indices) -> np.ndarray:
        """``indices`` as an int64 array, refused when out of range or not extracted yet."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for cache {self.path} of {len(self)} samples")
        if not self.done[idx].all():
            raise CacheError(
                f"cache {self.path} is incomplete: {int((~self.done[idx]).sum())} of the requested samples "
                "are not extracted yet; run `satdifuser extract` again to resume"
            )
        return idx

    def _rows(self, name: str, indices) -> np.ndarray:
        return self._read(name, self._checked(indices))

    def _read(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of one array; every object holding them must be stored (no fill values)."""
        if self.direct_reads:
            if name not in self._readers:
                self._readers[name] = ShardReader.for_array(self.array(name))
            if self._readers[name] is not None:
                return self._readers[name].read(idx)
        self.require_stored(name, idx)
        array = self.array(name)
        try:
            return self._zarr_read(array, idx)
        except CacheError:
            raise
        except Exception:  # codec and checksum errors come in several types
            raise self._unreadable(name, array, idx) from None

    def _unreadable(self, name: str, array, idx: np.ndarray) -> DamagedData:
        """The error for a read that failed, naming the first shard that fails on its own."""
        per_file = self.specs[name].rows_per_file
        for shard in np.unique(idx // per_file).tolist():
            rows = (shard * per_file, min((shard + 1) * per_file, len(self)))
            try:
                array[rows[0] : rows[1]]
            except Exception as err:
                return DamagedData(self.path, name, rows, f"cannot be read ({type(err).__name__}: {err})")
        return DamagedData(self.path, name, (int(idx.min()), int(idx.max()) + 1), "cannot be read")

    def require_stored(self, name: str, idx: np.ndarray) -> None:
        """Raise naming the array and rows when an object holding rows ``idx`` is not in the store:
        zarr would return its fill value instead."""
        array = self.array(name)
        per_file = self.specs[name].rows_per_file
        for shard in np.unique(idx // per_file).tolist():
            if (name, shard) in self._present:
                continue
            if self._presence is None:
                self._presence = ChunkPresence(self.root.store)
            key = object_key(array, shard)
            if not self._presence.has(key):
                rows = (shard * per_file, min((shard + 1) * per_file, len(self)))
                raise DamagedData(self.path, name, rows, f"its stored object {key} is missing")
            self._present.add((name, shard))

    @staticmethod
    def _zarr_read(array, idx: np.ndarray) -> np.ndarray:
        if idx.size and np.all(np.diff(idx) == 1):
            return array[int(idx[0]) : int(idx[-1]) + 1]  # contiguous: one slice, whole shards
        if idx.size and np.all(np.diff(idx) > 0):
            # Long runs (whole shards, as shard-aligned shuffling asks for) read fastest as slices;
            # zarr's selection by index goes chunk by chunk.
            runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
            if len(runs) * 8 <= len(idx):
                return np.concatenate([array[int(r[0]) : int(r[-1]) + 1] for r in runs])
        return array.get_orthogonal_selection((idx,))

    def features(self, indices, timesteps=None, layers=None) -> dict[str, dict[str, torch.Tensor]]:
        """``{timestep: {layer: (B, C, H, W) float16 tensor}}``; unselected arrays are not read."""
        self.require("maps", "reading feature maps")
        timesteps, layers = self._select(timesteps, layers)
        keys = [(t, l) for t in timesteps for l in layers]
        idx = self._checked(indices)
        read = lambda key: torch.from_numpy(self._maps(*key, idx))  # noqa: E731
        per_array = idx.size * sum(2 * np.prod(self.plan.layer_shapes[l]) for l in layers) / max(len(layers), 1)
        parallel = READ_THREADS > 1 and len(keys) > 1 and per_array >= PARALLEL_BYTES
        maps = dict(zip(keys, _read_pool().map(read, keys) if parallel else map(read, keys)))
        return {t: {l: maps[t, l] for l in layers} for t in timesteps}

    def _maps(self, t: str, layer: str, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of one layer's maps as float16, decoded from the cache's map encoding (bitround
        maps are float16 already)."""
        stored = self._read(feature_path(t, layer), idx)
        if self.map_encoding != "uint8":
            return stored
        return uint8_decode(stored, self._read(feature_scale_path(t, layer), idx))

    def pooled(self, indices, timesteps=None, layers=None) -> dict[str, dict[str, torch.Tensor]]:
        self.require("pooled", "reading pooled vectors")
        timesteps, layers = self._select(timesteps, layers)
        idx = self._checked(indices)
        return {t: {l: torch.from_numpy(self._read(pooled_path(t, l), idx)) for l in layers} for t in timesteps}

    def trajectory(self, indices, timesteps=None) -> dict[str, torch.Tensor]:
        self.require("trajectory", "reading the trajectory")
        timesteps, _ = self._select(timesteps, None)
        return {t: torch.from_numpy(self._rows(trajectory_path(t), indices)) for t in timesteps}

    def latents(self, indices) -> torch.Tensor:
        self.require("trajectory", "reading latents")
        return torch.from_numpy(self._rows("latents", indices))

    def labels(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._rows("labels", indices)))

    def dataset(self, timesteps=None, layers=None, pooled: bool = False) -> CacheDataset:
        return CacheDataset(self, timesteps, layers, pooled)

    # --- for other tools (``views``) ----------------------------------------------------------
    def to_dask(self, decode: bool = True) -> dict:
        """``{array path: dask array}``, one chunk per shard; uint8 maps decoded unless ``decode=False``."""
        from .views import dask_arrays

        return dask_arrays(self, decode)

    def to_xarray(self, decode: bool = True):
        """An ``xarray.DataTree`` over the store's groups, lazy, with the sample names as coordinate."""
        from .views import datatree

        return datatree(self, decode)


class CacheDataset(Dataset):
    """A torch Dataset over a cache: ``{"features": {t: {layer: tensor}}, "label", "index"}``."""

    def __init__(self, cache: FeatureCache, timesteps=None, layers=None, pooled: bool = False):
        self.cache = cache
        self.timesteps, self.layers = cache._select(timesteps, layers)
        self.pooled = pooled

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        read = self.cache.pooled if self.pooled else self.cache.features
        feats = read([index], self.timesteps, self.layers)
        return {
            "features": {t: {l: x[0] for l, x in by_layer.items()} for t, by_layer in feats.items()},
            "label": self.cache.labels([index])[0],
            "index": index,
        }
