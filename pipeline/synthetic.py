"""Caches with made-up features and a known answer, for tests and benchmarks.

Every array of the layout is written, with seeded Gaussian noise, so any reader works on it. The
``signal`` cells (timestep, layer) also carry the label: for classification every pixel of their maps
gets its class's mean vector added, for segmentation each pixel gets the mean vector of its own
(downsampled) label. A probe should find those cells and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cache.layout import CachePlan, shard_arrays
from .cache.writer import CacheWriter


def write_synthetic_cache(path: str, labels: np.ndarray, timesteps: tuple[str, ...], layer_shapes: dict,
                          signal: dict | None = None, num_classes: int | None = None, shard_size: int = 64,
                          seed: int = 0, sample_names: list[str] | None = None, split: str = "train",
                          codec: str = "blosc-lz4", storage_options: dict | None = None) -> CacheWriter:
    """Write a complete cache for ``labels``: (N,) class ids, (N, K) multi-label 0/1 or (N, H, W) masks.

    ``signal`` maps (timestep, layer) to a strength (the class means' scale, noise has unit variance).
    """
    labels = np.asarray(labels)
    n = len(labels)
    num_classes = num_classes or (labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1)
    plan = CachePlan(num_samples=n, shard_size=shard_size, timesteps=tuple(timesteps), layer_shapes=dict(layer_shapes),
                     latent_shape=(4, 2, 2), label_shape=labels.shape[1:], label_dtype="int64" if labels.ndim == 1 else "uint8",
                     codec=codec)
    request = {"backbone": {"id": "synthetic"}, "extraction": {"seed": seed},
               "dataset": {"name": "synthetic", "split": split}}
    writer = CacheWriter.create(str(path), request, plan, storage_options=storage_options)
    rng = np.random.default_rng([seed, *split.encode()])  # other noise in every split
    # Class means are drawn from their own stream so they are the same for every split of a seed.
    means = {cell: np.random.default_rng([seed, i]).normal(size=(num_classes, layer_shapes[cell[1]][0]))
             for i, cell in enumerate(sorted(signal or {}))}
    names = sample_names or [f"{split}_{i:06d}" for i in range(n)]
    for shard in range(plan.num_shards):
        start, stop = plan.shard_range(shard)
        rows = labels[start:stop]
        parts = {"latents": rng.normal(size=(stop - start, *plan.latent_shape)).astype(np.float32),
                 "labels": rows, "sample_names": np.array(names[start:stop]),
                 "trajectory": {}, "features": {}, "pooled": {}}
        for t in timesteps:  # drawn in this order, so that a seed gives the same cache
            parts["trajectory"][t] = rng.normal(size=(stop - start, *plan.latent_shape)).astype(np.float32)
            maps = parts["features"][t] = {}
            for layer, shape in layer_shapes.items():
                values = rng.normal(size=(stop - start, *shape)).astype(np.float32)
                if (t, layer) in means:
                    values += signal[(t, layer)] * _class_maps(means[(t, layer)], rows, shape[1:])
                maps[layer] = values.astype(np.float16)
            parts["pooled"][t] = {layer: m.astype(np.float32).mean(axis=(2, 3)) for layer, m in maps.items()}
        writer.write_shard(shard, shard_arrays(plan, parts))
    return writer


def _class_maps(means: np.ndarray, rows: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(n, C, H, W): each pixel's class mean (the sum of its classes' for multi-label); masks are
    brought to (H, W) by nearest neighbour."""
    if rows.ndim == 2:
        return np.broadcast_to((rows @ means)[:, :, None, None], (len(rows), means.shape[1], *hw))
    if rows.ndim == 1:
        return np.broadcast_to(means[rows][:, :, None, None], (len(rows), means.shape[1], *hw))
    masks = F.interpolate(torch.from_numpy(rows.astype(np.float32))[:, None], size=hw, mode="nearest")
    return means[masks[:, 0].long().numpy()].transpose(0, 3, 1, 2)
