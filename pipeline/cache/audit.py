"""`cache info` and `cache verify`: what a cache holds, and whether all of it can be trusted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encoding import relative_l2, uint8_decode
from .layout import BASE, EXACT_ENCODING, array_specs, feature_path, feature_scale_path, pooled_path, tier_of
from .reader import FeatureCache
from .store import CacheError, DamagedData
from .writer import lacking_objects


def _stored_bytes(array) -> int:
    return int(array.nbytes_stored())



def map_errors(cache: FeatureCache) -> dict:
    """Per ``t/layer`` of a lossy cache: max absolute and relative L2 error against the exact float16
    maps, over every image written, with the worst layer (by relative L2); {} for exact maps."""
    # A fill of the maps that has not finished has sums of maps the cache does not hold yet.
    sums = (cache.attrs.get("map_error") or {}) if cache.plan.holds("maps") else {}
    per_layer = {key: {"max_abs": s["max_abs"], "rel_l2": relative_l2(s), "images": s["images"]}
                 for key, s in sums.items()}
    if not per_layer:
        return {}
    worst = max(per_layer, key=lambda k: per_layer[k]["rel_l2"])
    return {"worst": {"layer": worst, **per_layer[worst]}, "max_abs": max(e["max_abs"] for e in per_layer.values()),
            "per_layer": per_layer}


def cache_info(cache: FeatureCache) -> dict:
    """Contents, sizes on disk (in total and per tier) and provenance of a cache."""
    plan = cache.plan
    n = plan.num_samples
    feat_raw = feat_disk = 0
    by_tier = dict.fromkeys((*plan.tiers, BASE), 0)
    for spec in array_specs(plan):
        array = cache.array(spec.name)
        stored = _stored_bytes(array)
        by_tier[tier_of(spec.name)] += stored
        if spec.name.startswith("features/"):
            feat_raw += int(np.prod(array.shape)) * 2  # as exact float16, whatever the encoding
            feat_disk += stored
        elif spec.name.startswith("feature_scales/"):
            feat_disk += stored
    total = sum(by_tier.values())
    attrs = cache.attrs
    request = cache.request
    return {
        "path": cache.path,
        "num_samples": n,
        "done": int(cache.done.sum()),
        "tiers": list(plan.tiers),
        "map_encoding": plan.map_encoding if plan.holds("maps") else None,
        "timesteps": {t: request["extraction"].get("unet_timesteps", {}).get(t) for t in plan.timesteps},
        "layers": {k: list(v) for k, v in plan.layer_shapes.items()},
        "layer_idxs": request["extraction"].get("layer_idxs"),
        "shard_size": plan.shard_size,
        "codec": plan.codec,
        "feature_bytes_raw_fp16": feat_raw,
        "feature_bytes_on_disk": feat_disk,
        "compression_ratio": round(feat_raw / feat_disk, 3) if feat_disk else None,
        "bytes_on_disk": total,
        "bytes_per_image": round(total / n) if n else 0,
        "bytes_per_image_by_tier": {t: round(b / n) if n else 0 for t, b in by_tier.items()},
        "map_error": map_errors(cache),
        "unet_passes_per_image": attrs.get("unet_passes_per_image"),
        "ledger": attrs.get("ledger", {}),
        "backbone": request["backbone"]["id"],
        "extraction": request["extraction"],
        "dataset": request["dataset"],
        "created": attrs.get("created"),
        "code_version": attrs.get("code_version"),
        "done_shards_lacking_files": _lacking_files(cache),
    }


@dataclass(frozen=True)
class Problem:
    """One finding of `cache verify`; ``shards`` are the shards re-extracting would mend (none: the
    cache cannot be mended shard by shard)."""

    text: str
    shards: tuple[int, ...] = ()


def verify_cache(cache: FeatureCache, rtol: float = 2e-3, atol: float = 1e-3) -> list[str]:
    """Every problem found, as one line each; an empty list means the cache is sound."""
    return [p.text for p in audit(cache, rtol, atol)]


def audit(cache: FeatureCache, rtol: float = 2e-3, atol: float = 1e-3) -> list[Problem]:
    """Every problem found (see ``verify_cache``).

    Checks: every shard done; every array of the held tiers present with the planned shape; every
    shard marked done stored in every array (a missing one would read as zeros) and readable
    (checksums catch truncation and corruption); when the cache holds both maps and pooled vectors,
    the pooled vectors equal the spatial mean of the stored maps within float16 rounding, widened
    for lossy maps by the largest error recorded for that layer at write time (the mean of the
    decoded maps is off the exact maps' mean by at most that). A lossy cache that records no error
    for a layer has its check replaced by a problem saying so.
    """
    plan = cache.plan
    problems = []
    pending = [s for s in range(plan.num_shards) if not cache.done[slice(*plan.shard_range(s))].all()]
    for shard in pending:
        try:  # a damaged done chunk reads as not done: say so, it is not merely unfinished work
            cache.array("done")[slice(*plan.shard_range(shard))]
        except Exception as err:
            problems.append(Problem(f"done: shard {shard} (rows {_rows(plan, shard)}): cannot be read "
                                    f"({type(err).__name__})", (shard,)))
    if pending:
        problems.insert(0, Problem(f"{int((~cache.done).sum())} of {plan.num_samples} samples are not marked done "
                                f"(shards {_short(pending)}); `satdifuser extract` resumes them", tuple(pending)))
    structure = []
    for spec in array_specs(plan):
        try:
            cache.array(spec.name)
        except CacheError as err:
            structure.append(Problem(f"{spec.name}: {_reason(err)}"))
    if structure:  # shards cannot be checked, nor mended one by one
        return problems + structure
    done = [s for s in range(plan.num_shards) if s not in set(pending)]
    lacking = _lacking_files(cache, done)
    for shard, keys in lacking.items():
        problems.append(Problem(f"shard {shard} (rows {_rows(plan, shard)}) is marked done but {len(keys)} of its "
                                f"stored objects are missing: {_short(keys)}", (shard,)))
    for shard in done:
        if shard not in lacking:
            problems += _check_shard(cache, shard, rtol, atol)
    return problems


def _rows(plan, shard: int) -> str:
    start, stop = plan.shard_range(shard)
    return f"{start}-{stop - 1}"


def _short(items: list, limit: int = 6) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _reason(err: Exception) -> str:
    return err.what if isinstance(err, DamagedData) else str(err)


def _lacking_files(cache: FeatureCache, shards: list[int] | None = None) -> dict[int, list[str]]:
    """Done shards (or ``shards``) whose stored objects are not all there, with the missing keys."""
    if shards is None:
        shards = [s for s in range(cache.plan.num_shards) if cache.done[slice(*cache.plan.shard_range(s))].all()]
    return lacking_objects(cache.root, cache.plan, shards)


def _check_shard(cache: FeatureCache, shard: int, rtol: float, atol: float) -> list[Problem]:
    """Every array of one shard read (checksums), and its pooled vectors against its maps."""
    plan = cache.plan
    rows = np.arange(*plan.shard_range(shard))
    where = f"shard {shard} (rows {_rows(plan, shard)})"
    problems = []

    def read(name):
        try:
            return cache._read(name, rows)
        except CacheError as err:
            problems.append(Problem(f"{name}: {where}: {_reason(err)}", (shard,)))
            return None

    both = plan.holds("maps") and plan.holds("pooled")
    scales = {}
    for spec in array_specs(plan)[:-1]:
        if not (both and spec.name.startswith(("features/", "pooled/"))):
            scales[spec.name] = read(spec.name)
    if not both:
        return problems
    recorded = cache.attrs.get("map_error") or {}
    lossy = plan.map_encoding != EXACT_ENCODING
    for t in plan.timesteps:
        for layer in plan.layer_shapes:
            if lossy and f"{t}/{layer}" not in recorded:
                problems.append(Problem(f"{feature_path(t, layer)}: the cache is {plan.map_encoding} but records no "
                                        "error for it, so its pooled vectors cannot be checked against it"))
                continue
            maps, pooled = read(feature_path(t, layer)), read(pooled_path(t, layer))
            if plan.map_encoding == "uint8" and maps is not None:
                scale_rows = scales[feature_scale_path(t, layer)]
                maps = None if scale_rows is None else uint8_decode(maps, scale_rows)
            if maps is None or pooled is None:
                continue
            values = maps.astype(np.float32)
            mean = values.mean(axis=(2, 3))
            # Pooled vectors are means of the activations before their rounding to float16, so they
            # may differ from the stored maps' means by up to half an fp16 step of the largest value;
            # lossy maps' means by up to their largest recorded error more.
            slack = recorded[f"{t}/{layer}"]["max_abs"] if lossy else 0.0
            scale = np.abs(values).max(axis=(2, 3)) + slack
            if not np.all(np.abs(mean - pooled) <= atol + rtol * scale + slack):
                err = float(np.abs(mean - pooled).max())
                problems.append(Problem(f"{pooled_path(t, layer)}: {where}: differs from the mean of its maps by "
                                        f"{err:.3g}", (shard,)))
    return problems
