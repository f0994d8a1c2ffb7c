"""Reading any subset of timesteps x layers from a cache, for a batch of indices."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

from .layout import ATTRS_KEY, FORMAT_VERSION, CachePlan, feature_path, pooled_path, trajectory_path
from .shards import ShardReader
from .store import CacheError, CacheMismatch, differences, open_root

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
               direct_reads: bool = True) -> "FeatureCache":
    """Open a cache read-only; with ``expect``, refuse one built for another request.

    ``expect`` is a partial request, e.g. ``{"backbone": {"id": ...}, "extraction": {...}}``:
    only the keys it names are compared. ``direct_reads`` reads feature maps of a local cache
    straight from its shard files (``shards.ShardReader``); off, every read goes through zarr.
    """
    try:
        root = open_root(path, "r", storage_options)
    except FileNotFoundError:
        raise CacheError(f"no cache at {path}; run `satdifuser extract` first") from None
    except Exception as err:  # zarr raises several kinds for "not a group here"
        raise CacheError(f"no cache at {path} ({type(err).__name__}); run `satdifuser extract` first") from None
    attrs = root.attrs.get(ATTRS_KEY)
    if attrs is None:
        raise CacheError(f"{path} is a Zarr store but not a feature cache (no '{ATTRS_KEY}' attributes)")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"cache {path} has format version {attrs.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; rebuild it with `satdifuser extract --overwrite`"
        )
    cache = FeatureCache(root, path, attrs, direct_reads)
    if expect:
        cache.check(expect)
    return cache


def _subset(request: dict, expect: dict) -> dict:
    return {k: _subset(request.get(k, {}), v) if isinstance(v, dict) else request.get(k, "<absent>")
            for k, v in expect.items()}


class FeatureCache:
    def __init__(self, root, path: str, attrs: dict, direct_reads: bool = True):
        self.root = root
        self.path = path
        self.attrs = attrs
        self.plan = CachePlan.from_attrs(attrs["plan"])
        self.direct_reads = direct_reads
        self._readers: dict[str, ShardReader | None] = {}

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

    @cached_property
    def done(self) -> np.ndarray:
        """Done flags; a shard whose flags cannot be read counts as not done."""
        done = np.zeros(len(self), dtype=bool)
        for shard in range(self.plan.num_shards):
            rows = slice(*self.plan.shard_range(shard))
            try:
                done[rows] = self.root["done"][rows]
            except Exception:  # a damaged chunk: `cache verify` names it
                pass
        return done

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @cached_property
    def sample_names(self) -> list[str]:
        return [str(s) for s in self.root["sample_names"][:]]

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
        """Rows ``idx`` (checked) of one array."""
        if self.direct_reads:
            if name not in self._readers:
                self._readers[name] = ShardReader.for_array(self.root[name])
            if self._readers[name] is not None:
                return self._readers[name].read(idx)
        array = self.root[name]
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
        timesteps, layers = self._select(timesteps, layers)
        keys = [(t, l) for t in timesteps for l in layers]
        idx = self._checked(indices)
        read = lambda key: torch.from_numpy(self._read(feature_path(*key), idx))  # noqa: E731
        per_array = idx.size * sum(2 * np.prod(self.plan.layer_shapes[l]) for l in layers) / max(len(layers), 1)
        parallel = READ_THREADS > 1 and len(keys) > 1 and per_array >= PARALLEL_BYTES
        maps = dict(zip(keys, _read_pool().map(read, keys) if parallel else map(read, keys)))
        return {t: {l: maps[t, l] for l in layers} for t in timesteps}

    def pooled(self, indices, timesteps=None, layers=None) -> dict[str, dict[str, torch.Tensor]]:
        timesteps, layers = self._select(timesteps, layers)
        idx = self._checked(indices)
        return {t: {l: torch.from_numpy(self._read(pooled_path(t, l), idx)) for l in layers} for t in timesteps}

    def trajectory(self, indices, timesteps=None) -> dict[str, torch.Tensor]:
        timesteps, _ = self._select(timesteps, None)
        return {t: torch.from_numpy(self._rows(trajectory_path(t), indices)) for t in timesteps}

    def latents(self, indices) -> torch.Tensor:
        return torch.from_numpy(self._rows("latents", indices))

    def labels(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._rows("labels", indices)))

    def dataset(self, timesteps=None, layers=None, pooled: bool = False) -> "CacheDataset":
        return CacheDataset(self, timesteps, layers, pooled)


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
