"""`cache info` and `cache verify`: what a cache holds, and whether all of it can be trusted."""

from __future__ import annotations

import math

import numpy as np

from .layout import feature_path, pooled_path, trajectory_path
from .reader import FeatureCache


def _stored_bytes(array) -> int:
    return int(array.nbytes_stored())


def cache_info(cache: FeatureCache) -> dict:
    """Contents, sizes on disk and provenance of a cache."""
    plan = cache.plan
    n = plan.num_samples
    feat_raw = feat_disk = 0
    for t in plan.timesteps:
        for layer in plan.layer_shapes:
            array = cache.root[feature_path(t, layer)]
            feat_raw += array.nbytes
            feat_disk += _stored_bytes(array)
    other_disk = sum(_stored_bytes(cache.root[name]) for name in _other_arrays(cache))
    attrs = cache.attrs
    return {
        "path": cache.path,
        "num_samples": n,
        "done": int(cache.done.sum()),
        "timesteps": {t: attrs["request"]["extraction"].get("unet_timesteps", {}).get(t) for t in plan.timesteps},
        "layers": {k: list(v) for k, v in plan.layer_shapes.items()},
        "shard_size": plan.shard_size,
        "codec": plan.codec,
        "feature_bytes_raw_fp16": feat_raw,
        "feature_bytes_on_disk": feat_disk,
        "compression_ratio": round(feat_raw / feat_disk, 3) if feat_disk else None,
        "bytes_on_disk": feat_disk + other_disk,
        "bytes_per_image": round((feat_disk + other_disk) / n) if n else 0,
        "unet_passes_per_image": attrs.get("unet_passes_per_image"),
        "ledger": attrs.get("ledger", {}),
        "backbone": attrs["request"]["backbone"]["id"],
        "extraction": attrs["request"]["extraction"],
        "dataset": attrs["request"]["dataset"],
        "created": attrs.get("created"),
        "code_version": attrs.get("code_version"),
    }


def _other_arrays(cache: FeatureCache) -> list[str]:
    plan = cache.plan
    names = ["latents", "labels", "sample_names", "done"]
    for t in plan.timesteps:
        names.append(trajectory_path(t))
        names += [pooled_path(t, layer) for layer in plan.layer_shapes]
    return names


def verify_cache(cache: FeatureCache, rtol: float = 2e-3, atol: float = 1e-3) -> list[str]:
    """Every problem found, as one line each; an empty list means the cache is sound.

    Checks: every unit done; every array present with the planned shape and all its shards
    stored (a missing shard would silently read as zeros); every byte readable (checksums catch
    truncation and corruption); pooled vectors equal the spatial mean of the stored maps.
    """
    plan = cache.plan
    problems = []
    if not cache.done.all():
        problems.append(f"{int((~cache.done).sum())} of {plan.num_samples} samples are not marked done")
    for name, shape in _planned_shapes(plan).items():
        # Feature maps are read once, by the pooled check below.
        problems += _check_array(cache, name, shape, read=not name.startswith("features/"))
    if problems:
        return problems
    for t in plan.timesteps:
        for layer in plan.layer_shapes:
            problems += _check_pooled(cache, t, layer, rtol, atol)
    return problems


def _planned_shapes(plan) -> dict:
    n = plan.num_samples
    shapes = {"latents": (n, *plan.latent_shape), "labels": (n, *plan.label_shape), "sample_names": (n,), "done": (n,)}
    for t in plan.timesteps:
        shapes[trajectory_path(t)] = (n, *plan.latent_shape)
        for layer, shape in plan.layer_shapes.items():
            shapes[feature_path(t, layer)] = (n, *shape)
            shapes[pooled_path(t, layer)] = (n, shape[0])
    return shapes


def _read(array, start: int, step: int):
    try:
        return array[start : start + step], None
    except Exception as err:  # codec and checksum errors come in several types
        rows = f"rows {start}-{min(start + step, array.shape[0]) - 1}"
        return None, f"{array.path}: {rows} unreadable ({type(err).__name__}: {err})"


def _expected_chunks(array) -> int:
    """Chunks a complete array stores; zarr counts every inner chunk slot of a stored shard."""
    if array.shards is None:
        return array.nchunks
    shards = math.prod(-(-n // s) for n, s in zip(array.shape, array.shards))
    return shards * math.prod(s // c for s, c in zip(array.shards, array.chunks))


def _check_array(cache: FeatureCache, name: str, shape: tuple, read: bool) -> list[str]:
    try:
        array = cache.root[name]
    except KeyError:
        return [f"{name}: missing"]
    if tuple(array.shape) != tuple(shape):
        return [f"{name}: shape {tuple(array.shape)}, planned {tuple(shape)}"]
    # A missing chunk or shard silently reads as zeros: count what the store holds.
    expected, stored = _expected_chunks(array), array.nchunks_initialized
    if stored != expected:
        return [f"{name}: {expected - stored} of {expected} chunks missing"]
    step = cache.plan.shard_size
    for start in range(0, shape[0], step) if read else ():
        error = _read(array, start, step)[1]
        if error:
            return [error]
    return []


def _check_pooled(cache: FeatureCache, t: str, layer: str, rtol: float, atol: float) -> list[str]:
    maps = cache.root[feature_path(t, layer)]
    pooled = cache.root[pooled_path(t, layer)]
    step = cache.plan.shard_size
    for start in range(0, maps.shape[0], step):
        rows, error = _read(maps, start, step)
        if error:
            return [error]
        values = rows.astype(np.float32)
        mean, stored = values.mean(axis=(2, 3)), pooled[start : start + step]
        # Pooled vectors are means of the activations before their rounding to float16, so they
        # may differ from the stored maps' means by up to half an fp16 step of the largest value.
        scale = np.abs(values).max(axis=(2, 3))
        if not np.all(np.abs(mean - stored) <= atol + rtol * scale):
            err = float(np.abs(mean - stored).max())
            return [f"pooled/{t}/{layer}: differs from the mean of its maps by {err:.3g} at rows {start}+"]
    return []
