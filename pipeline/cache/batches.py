"""Batches of cached features for training: shuffled per epoch, read ahead in the background."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from .reader import FeatureCache

_DONE = object()


def shard_buffers(indices, shard_size: int, buffer_shards: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shard-aligned shuffling: the shards in a seeded random order, ``buffer_shards`` at a time,
    and the images of each group in a random order. Each group is read as whole shards."""
    if shard_size < 1 or buffer_shards < 1:
        raise ValueError(f"shard_size and buffer_shards must be at least 1, not {shard_size} and {buffer_shards}")
    idx = np.arange(indices) if isinstance(indices, int) else np.asarray(indices)
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(np.unique(idx // shard_size))
    groups = [shards[i : i + buffer_shards] for i in range(0, len(shards), buffer_shards)]
    return [rng.permutation(idx[np.isin(idx // shard_size, group)]) for group in groups]


def batch_order(indices, batch_size: int, shuffle: bool, seed: int, epoch: int, shard_size: int = 0,
                buffer_shards: int = 0) -> list[np.ndarray]:
    """Batches of one epoch, each sorted: with ``shuffle``, a seeded permutation of all images per
    epoch (the reference's), or shard-aligned (``shard_buffers``) when ``buffer_shards`` > 0."""
    idx = np.arange(indices) if isinstance(indices, int) else np.asarray(indices)
    if shuffle and buffer_shards > 0:
        idx = np.concatenate(shard_buffers(idx, shard_size, buffer_shards, seed, epoch) or [idx])
    elif shuffle:
        idx = np.random.default_rng([seed, epoch]).permutation(idx)
    return [np.sort(idx[i : i + batch_size]) for i in range(0, len(idx), batch_size)]


def _gather(pieces, size: int) -> torch.Tensor:
    """A batch's tensor from (positions in the group, positions in the batch, the group's tensor) per serving group."""
    if len(pieces) == 1:  # the usual case: one gather, no further copy
        rows, _, tensor = pieces[0]
        return tensor[rows]
    first = pieces[0][2]
    out = first.new_empty((size, *first.shape[1:]))
    for rows, places, tensor in pieces:
        out[places] = tensor[rows]
    return out


class CacheBatches:
    """Yields ``(features, labels, indices)`` with ``features[t][layer]`` a float16 tensor.

    Reading runs in a thread ``prefetch`` batches ahead of the consumer, so training computes
    while the next batches are read and decoded (file reads and decompression release the GIL).
    Indices within a batch are sorted: reads then touch each shard once, in order. With
    ``preload`` the selected arrays are read once, whole shards in order, and kept in memory,
    which saves the per-image Python work of every later epoch when the maps are small. With
    ``buffer_shards`` > 0 (and ``shuffle``), batches follow ``shard_buffers``: each group of
    shards is read whole, one sequential read per shard and array, and its images are served
    from memory; the images of a batch then come from a few shards only.
    """

    def __init__(self, cache: FeatureCache, batch_size: int, timesteps=None, layers=None,
                 shuffle: bool = False, seed: int = 0, prefetch: int = 2, indices=None, preload: bool = False,
                 buffer_shards: int = 0):
        self.cache = cache
        self.timesteps, self.layers = cache._select(timesteps, layers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.buffer_shards = buffer_shards
        self.seed = seed
        self.prefetch = prefetch
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices)
        self.preload = preload
        self._memory = None

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def order(self, epoch: int) -> list[np.ndarray]:
        return batch_order(self.indices, self.batch_size, self.shuffle, self.seed, epoch,
                           self.cache.plan.shard_size, self.buffer_shards)

    def nbytes(self) -> int:
        """Bytes of the selected feature maps (float16) for these indices."""
        per_image = sum(int(np.prod(self.cache.layer_shapes[l])) for l in self.layers) * len(self.timesteps) * 2
        return per_image * len(self.indices)

    def read(self, idx: np.ndarray) -> tuple[dict, torch.Tensor, np.ndarray]:
        if self.preload:
            if self._memory is None:
                # Only the rows this source serves: a limited_label fit of a few percent of a large
                # split must not hold the whole split (nbytes, which decides preloading, counts these).
                held = np.unique(self.indices)
                self._memory = (held, self.cache.features(held, self.timesteps, self.layers), self.cache.labels(held))
            held, feats, labels = self._memory
            rows = torch.from_numpy(np.searchsorted(held, idx))
            return {t: {l: x[rows] for l, x in d.items()} for t, d in feats.items()}, labels[rows], idx
        return self.cache.features(idx, self.timesteps, self.layers), self.cache.labels(idx), idx

    def _buffered(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor, np.ndarray]]:
        """The batches of ``order(epoch)``, each group of shards read whole when first needed."""
        groups = shard_buffers(self.indices, self.cache.plan.shard_size, self.buffer_shards, self.seed, epoch)
        ready = np.cumsum([len(g) for g in groups])  # images available once group i is read
        order = np.concatenate(groups) if groups else np.empty(0, dtype=np.int64)
        held = []  # [sorted rows, features, labels, rows not served yet] per group read
        for start in range(0, len(order), self.batch_size):
            stop = min(start + self.batch_size, len(order))
            while len(held) < len(groups) and (ready[len(held) - 1] if held else 0) < stop:
                rows = np.sort(groups[len(held)])
                held.append([rows, self.cache.features(rows, self.timesteps, self.layers), self.cache.labels(rows), len(rows)])
            batch = np.sort(order[start:stop])
            parts = []  # (positions in the group, positions in the batch, features, labels) per serving group
            for group in held:
                rows, feats, labels, left = group
                if not left:
                    continue
                hit = np.isin(batch, rows)
                if hit.any():
                    parts.append((torch.from_numpy(np.searchsorted(rows, batch[hit])), torch.from_numpy(np.flatnonzero(hit)),
                                  feats, labels))
                    group[3] -= int(hit.sum())
            yield ({t: {l: _gather([(p[0], p[1], p[2][t][l]) for p in parts], len(batch)) for l in self.layers}
                    for t in self.timesteps},
                   _gather([(p[0], p[1], p[3]) for p in parts], len(batch)), batch)
            # Free groups served in full before the next group is read.
            parts = feats = labels = None
            held = [g if g[3] else [g[0], None, None, 0] for g in held]

    def _items(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor, np.ndarray]]:
        if self.shuffle and self.buffer_shards > 0 and not self.preload:
            yield from self._buffered(epoch)
        else:
            yield from (self.read(b) for b in self.order(epoch))

    def epoch(self, epoch: int = 0) -> Iterator[tuple[dict, torch.Tensor, np.ndarray]]:
        items = self._items(epoch)
        if self.prefetch <= 0:
            yield from items
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for item in items:
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(_DONE)
            except BaseException as err:  # handed to the consumer, which re-raises it
                q.put(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
