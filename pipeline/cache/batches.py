"""Batches of cached features for training: shuffled per epoch, read ahead in the background."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from .reader import FeatureCache

_DONE = object()


def batch_order(indices, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[np.ndarray]:
    """Batches of one epoch: a seeded permutation per epoch when shuffling, each batch sorted."""
    idx = np.arange(indices) if isinstance(indices, int) else np.asarray(indices)
    if shuffle:
        idx = np.random.default_rng([seed, epoch]).permutation(idx)
    return [np.sort(idx[i : i + batch_size]) for i in range(0, len(idx), batch_size)]


class CacheBatches:
    """Yields ``(features, labels, indices)`` with ``features[t][layer]`` a float16 tensor.

    Reading runs in a thread ``prefetch`` batches ahead of the consumer, so training computes
    while the next batches are read and decoded (zarr and numpy release the GIL for that work).
    Indices within a batch are sorted: reads then touch each shard once, in order. With
    ``preload`` the selected arrays are read once, whole shards in order, and kept in memory:
    random access to one-image chunks costs about half a millisecond per chunk and array, which
    dominates when the maps are small.
    """

    def __init__(self, cache: FeatureCache, batch_size: int, timesteps=None, layers=None,
                 shuffle: bool = False, seed: int = 0, prefetch: int = 2, indices=None, preload: bool = False):
        self.cache = cache
        self.timesteps, self.layers = cache._select(timesteps, layers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = prefetch
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices)
        self.preload = preload
        self._memory = None

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def order(self, epoch: int) -> list[np.ndarray]:
        return batch_order(self.indices, self.batch_size, self.shuffle, self.seed, epoch)

    def nbytes(self) -> int:
        """Bytes of the selected feature maps (float16) for these indices."""
        per_image = sum(int(np.prod(self.cache.layer_shapes[l])) for l in self.layers) * len(self.timesteps) * 2
        return per_image * len(self.indices)

    def read(self, idx: np.ndarray) -> tuple[dict, torch.Tensor, np.ndarray]:
        if self.preload:
            if self._memory is None:
                every = np.arange(len(self.cache))
                self._memory = (self.cache.features(every, self.timesteps, self.layers), self.cache.labels(every))
            feats, labels = self._memory
            rows = torch.from_numpy(idx)
            return {t: {l: x[rows] for l, x in d.items()} for t, d in feats.items()}, labels[rows], idx
        return self.cache.features(idx, self.timesteps, self.layers), self.cache.labels(idx), idx

    def epoch(self, epoch: int = 0) -> Iterator[tuple[dict, torch.Tensor, np.ndarray]]:
        batches = self.order(epoch)
        if self.prefetch <= 0:
            yield from (self.read(b) for b in batches)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(self.read(b))
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
