"""A small cache made in code: its plan, the request it records, its shards, and where a shard's file lies."""

from pathlib import Path

import numpy as np

from pipeline.cache.layout import CachePlan, feature_path, pooled_path, trajectory_path
from pipeline.cache.writer import CacheWriter

PLAN = CachePlan(
    num_samples=10, shard_size=4, timesteps=("t47", "t40"),
    layer_shapes={"up_blocks_1_attn1_0": (8, 4, 4), "up_blocks_3_conv2_2": (4, 8, 8)},
    latent_shape=(4, 8, 8), label_shape=(), label_dtype="int64",
)
REQUEST = {"backbone": {"id": "abc"}, "extraction": {"save_timesteps": [47, 40], "prompt": "p"},
           "dataset": {"name": "toy", "split": "train"}}


def fake_shard(plan: CachePlan, shard: int, seed: int = 0) -> dict:
    start, stop = plan.shard_range(shard)
    n = stop - start
    rng = np.random.default_rng(seed + shard)
    arrays = {"latents": rng.normal(size=(n, *plan.latent_shape)).astype(np.float32),
              "labels": np.arange(start, stop), "sample_names": np.array([f"s{i}" for i in range(start, stop)])}
    for t in plan.timesteps:
        arrays[trajectory_path(t)] = rng.normal(size=(n, *plan.latent_shape)).astype(np.float32)
        for layer, shape in plan.layer_shapes.items():
            maps = rng.normal(size=(n, *shape)).astype(np.float16)
            arrays[feature_path(t, layer)] = maps
            arrays[pooled_path(t, layer)] = maps.astype(np.float32).mean(axis=(2, 3))
    return arrays


def build(path, shards=None, plan=PLAN) -> CacheWriter:
    writer = CacheWriter.create(str(path), REQUEST, plan)
    for shard in range(plan.num_shards) if shards is None else shards:
        writer.write_shard(shard, fake_shard(plan, shard))
    return writer


def _shard_file(root: Path, t="t47", layer="up_blocks_3_conv2_2", shard=1) -> Path:
    return root / "features" / t / layer / "c" / str(shard) / "0" / "0" / "0"
