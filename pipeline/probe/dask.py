"""The probe map on a Dask cluster: the same probes as ``Probe.run``, fitted as tasks on workers.

Inputs are read with ``dask.array.from_zarr`` in chunks of one shard (the cache's stored object;
a chunk per image would be a task per image), and each (split, timestep, layer) input becomes one
future held on a worker. For segmentation every shard of maps is resized and sampled at the
split's pixel positions in its own task, so only the sample, never a split's maps, is in any one
memory. Every probe is then one task given the futures of its inputs (``client.submit``): the
scheduler moves the inputs, not this process. The per-shard functions and ``probe_cell`` are the
ones the local run uses, so the map equals the local one.

Why futures and not joblib's dask backend: under ``parallel_config(backend="dask")`` each call
ships its arguments, and a probe's arguments are the split objects holding every input of the
map; with one future per input a probe receives only its own inputs, read where they were read.
"""

from __future__ import annotations

import numpy as np

from ..cache.layout import feature_path, feature_scale_path, pooled_path
from ..cache.store import CacheError
from ..errors import first_line
from .map import Cell, grid_labels, probe_cell, sample_pixels, take_images


class Held:
    """One split's inputs for one probe, on a worker: what ``probe_cell`` asks of a split."""

    def __init__(self, parts: list, labels: np.ndarray, rows, per_image: int):
        self.parts = [take_images(p, rows, per_image) for p in parts] if rows is not None else parts
        self._labels = take_images(labels, rows, per_image) if rows is not None else labels
        self.images = len(rows) if rows is not None else len(labels) // max(per_image, 1)

    def __len__(self) -> int:
        return self.images

    def matrix(self, cell, timesteps, layers) -> np.ndarray:
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts, axis=1)

    def labels(self, num_classes: int) -> np.ndarray:
        return self._labels


def fit_cell(cell: Cell, parts: dict, labels: dict, train_rows, per_image: dict, task: str, num_classes: int,
             timesteps, layers, settings) -> dict:
    """One row of the probe map, on a worker, from the cell's inputs of each split."""
    splits = {s: Held(parts[s], labels[s], train_rows if s == "train" else None, per_image[s]) for s in parts}
    return probe_cell(cell, splits, task, num_classes, timesteps, layers, settings)


def _sample_shard(stored, scales, pixels, grid):
    import torch

    from ..cache.encoding import uint8_decode

    maps = stored if scales is None else uint8_decode(stored, scales)
    return sample_pixels(torch.from_numpy(maps), pixels, grid)


def _from_zarr(cache, name: str):
    """One array as a dask array of shard-sized chunks; its stored objects are checked first, since
    zarr reads a missing one as its fill value."""
    import dask.array as da

    array = cache.array(name)
    cache.require_stored(name, np.arange(len(cache)))
    return da.from_zarr(array, chunks=(cache.specs[name].rows_per_file, *array.shape[1:]))


def _shards(cache, name: str) -> list:
    return _from_zarr(cache, name).to_delayed().reshape(-1).tolist()


class ClusterInputs:
    """Every split's inputs as futures on the cluster, read once and kept for every run."""

    def __init__(self, probe, client):
        self.probe, self.client = probe, client
        self._futures: dict = {}
        self._names: dict = {}  # future key -> (cache path, array) for a read that fails

    def per_image(self, split: str) -> int:
        return self.probe.splits[split].pixels_per_image if self.probe.grid else 0

    def part(self, split: str, t: str, layer: str):
        key = (split, t, layer)
        if key not in self._futures:
            self._futures[key] = self._compute(self._part(split, t, layer), split,
                                               feature_path(t, layer) if self.probe.grid else pooled_path(t, layer))
        return self._futures[key]

    def labels(self, split: str):
        if split not in self._futures:
            self._futures[split] = self._compute(self._labels(split), split, "labels")
        return self._futures[split]

    def fetch_labels(self, split: str) -> np.ndarray:
        future = self.labels(split)
        self.wait()
        return future.result()

    def _compute(self, graph, split: str, name: str):
        future = self.client.compute(graph)
        self._names[future.key] = (self.probe.splits[split].cache.path, name)
        return future

    def _part(self, split: str, t: str, layer: str):
        import dask.array as da
        from dask import delayed

        cache = self.probe.splits[split].cache
        if not self.probe.grid:
            return _from_zarr(cache, pooled_path(t, layer))
        stored = _shards(cache, feature_path(t, layer))
        scales = (_shards(cache, feature_scale_path(t, layer)) if cache.map_encoding == "uint8"
                  else [None] * len(stored))
        pixels, grid, channels = self.probe.splits[split]._pixels, self.probe.grid, cache.layer_shapes[layer][0]
        sample = delayed(_sample_shard, pure=True)
        return da.concatenate([
            da.from_delayed(sample(b, s, pixels[lo:hi], grid), ((hi - lo) * pixels.shape[1], channels), np.float32)
            for b, s, (lo, hi) in zip(stored, scales, self._ranges(cache))])

    def _labels(self, split: str):
        import dask.array as da
        from dask import delayed

        cache = self.probe.splits[split].cache
        if not self.probe.grid:
            return _from_zarr(cache, "labels")
        blocks = _shards(cache, "labels")
        pixels, grid, k = self.probe.splits[split]._pixels, self.probe.grid, self.probe.num_classes
        cells = delayed(grid_labels, pure=True)
        return da.concatenate([da.from_delayed(cells(b, pixels[lo:hi], k, grid), ((hi - lo) * pixels.shape[1],),
                                               np.int64) for b, (lo, hi) in zip(blocks, self._ranges(cache))])

    @staticmethod
    def _ranges(cache) -> list[tuple[int, int]]:
        return [cache.plan.shard_range(s) for s in range(cache.plan.num_shards)]

    def wait(self) -> None:
        """Block until every input is read; a read that failed is one line naming its cache and array."""
        from distributed import wait

        with self.client.as_current():  # the client is no default one (pipeline/cluster.py)
            wait(list(self._futures.values()))
        for future in self._futures.values():
            if future.status == "error":
                path, name = self._names[future.key]
                err = future.exception()
                raise CacheError(f"cache {path}: array {name} cannot be read on the cluster ({type(err).__name__}: "
                                 f"{first_line(err)}); run `satdifuser cache verify {path}`")


def run_on_cluster(probe, inputs: ClusterInputs, cells: list[Cell], train_rows=None) -> list[dict]:
    """The rows of ``cells`` (see ``Probe.run``), each probe a task on ``inputs``' cluster."""
    needed = dict.fromkeys(p for c in cells for p in c.parts(probe.timesteps, probe.layers))
    splits = list(probe.splits)
    for split in splits:
        inputs.labels(split)
        for t, layer in needed:
            inputs.part(split, t, layer)
    inputs.wait()
    per_image = {s: inputs.per_image(s) for s in splits}
    labels = {s: inputs.labels(s) for s in splits}
    rows = None if train_rows is None else np.asarray(train_rows, dtype=np.int64)
    futures = [inputs.client.submit(
        fit_cell, cell, {s: [inputs.part(s, t, l) for t, l in cell.parts(probe.timesteps, probe.layers)] for s in splits},
        labels, rows, per_image, probe.task, probe.num_classes, probe.timesteps, probe.layers, probe.settings,
        pure=False) for cell in cells]
    return inputs.client.gather(futures)


__all__ = ["ClusterInputs", "fit_cell", "run_on_cluster"]
