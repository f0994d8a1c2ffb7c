"""Adding the maps and/or pooled vectors to a complete cache from its stored trajectory.

Each saved label of each image costs one UNet pass from the stored UNet input x_t at that label's
timestep, stopped after the last layer of the cache's plan (``FeatureExtractor.from_trajectory``);
no VAE. The batches are the extraction's (``extract_batch_size`` within a shard), so the maps are
those a direct extraction computes (within float16 rounding: the extraction's UNet inputs are in the
VAE latents' memory layout, channels-last for some batch sizes on the CPU, a stored x_t reads back
contiguous, and kernels round by layout), and they are written by the same writer: in the cache's map
encoding, with its error sums and its ledger. Until every shard is filled the cache holds only
its old tiers (``CacheWriter.begin_fill``); a stopped fill resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..cache.layout import ATTRS_KEY, array_specs, ordered_tiers, shard_arrays, tiers_problem
from ..cache.lock import WriterLock
from ..cache.reader import FeatureCache, open_cache
from ..cache.store import CacheError, CacheMismatch, check_location
from ..cache.writer import FILL_KEY, CacheWriter, lacking_objects
from ..data.geobench_task import GeoBenchSplit
from ..errors import UserError
from .extractor import FeatureExtractor
from .run import Extraction, ShardBuffer, check_backbone, check_store_writable, shard_batches, write_and_count

log = logging.getLogger(__name__)

FILLABLE = ("maps", "pooled")


@dataclass
class FillResult:
    path: str
    num_samples: int
    added: tuple[str, ...]  # the tiers the cache holds now and did not before (none: nothing to do)
    already: tuple[str, ...]  # the tiers asked for that it held already
    filled: int  # images computed in this run
    seconds: float
    unet_passes: int
    vae_passes: int = 0

    @property
    def images_per_second(self) -> float:
        return self.filled / self.seconds if self.seconds else 0.0


def fill_from_trajectory(extraction: Extraction, split: str, path: str | None = None, tiers=None,
                         progress: bool = True, wait: bool = False) -> FillResult:
    """Add ``tiers`` (maps and/or pooled; default: those an unfinished fill is adding, else those of
    the config's ``store`` the cache lacks) to the cache at ``path`` (default ``cfg.cache_path(split)``)
    from its trajectory. The cache must be complete, hold the trajectory, come from the config's
    backbone and answer its extraction request. Tiers already held are left as they are."""
    cfg, options = extraction.cfg, extraction.storage_options
    path = path or cfg.cache_path(split)
    check_location(path, writing=True)
    cache = open_cache(path, options)
    adding, already = _tiers(cache, tiers, cfg.store)
    if not adding:
        log.info("cache %s holds %s already; nothing to fill", path, ",".join(already))
        return FillResult(path, len(cache), (), already, 0, 0.0, 0)
    request = _answered(extraction.request(GeoBenchSplit(extraction.source, split)), cache)
    check_backbone(cfg, [cache], request["backbone"]["id"])
    _reopen(path, request, options, "r")
    _check_complete(cache)
    with WriterLock(path, options, wait=wait) as lock:
        writer = _reopen(path, request, options, "r+")
        cache = open_cache(path, options)  # as it is now that no one else writes it
        adding, already = _tiers(cache, tiers, cfg.store)
        if not adding:
            return FillResult(path, len(cache), (), already, 0, 0.0, 0)
        check_store_writable(writer)
        fill = writer.begin_fill(adding, cfg.map_encoding)
        _mend(fill)
        filled, seconds = _fill(cfg.extract_batch_size, extraction.extractor, cache, fill, adding, progress, lock)
        ledger = dict(fill.root.attrs[ATTRS_KEY].get("ledger", {}))
        ledger["bytes_stored"] = sum(int(fill.root[spec.name].nbytes_stored()) for spec in array_specs(fill.plan))
        fill.finish_fill(ledger=ledger)
    passes = filled * len(fill.plan.timesteps)
    return FillResult(path, len(cache), adding, already, filled, seconds, passes)


def _tiers(cache: FeatureCache, asked, store) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tiers to add, tiers asked for and held) for ``asked`` tiers, refused in one line when the
    cache cannot take them from its trajectory."""
    held, unfinished = cache.tiers, cache.attrs.get(FILL_KEY)
    asked = list(asked if asked is not None else unfinished or store)
    problem = tiers_problem(asked)
    if problem:
        raise UserError(f"{problem}; --from-trajectory adds {' and/or '.join(FILLABLE)}")
    if "trajectory" not in held:
        wanted = ",".join(ordered_tiers({*held, *asked}))
        raise CacheError(f"cache {cache.path} holds the tiers {list(held)}, not trajectory, which --from-trajectory "
                         f"needs; re-extract with `satdifuser extract CONFIG --overwrite --store {wanted}`")
    adding = tuple(t for t in ordered_tiers(asked) if t not in held)
    if adding and unfinished and list(adding) != unfinished:
        raise CacheError(f"cache {cache.path} has an unfinished fill of {','.join(unfinished)} from its trajectory; "
                         f"finish it first with `satdifuser extract CONFIG --from-trajectory --store "
                         f"{','.join(unfinished)}`")
    return adding, tuple(t for t in ordered_tiers(asked) if t in held)


def _answered(request: dict, cache: FeatureCache) -> dict:
    """``request`` as the cache must answer it: a cache without maps has no map encoding to match,
    so the maps added to it take the config's (a lab shares the trajectory; each user stores maps in
    the encoding their disk allows)."""
    if cache.plan.holds("maps"):
        return request
    extraction = {k: v for k, v in request["extraction"].items() if k != "map_encoding"}
    held = cache.request["extraction"].get("map_encoding")
    return {**request, "extraction": {**extraction, **({"map_encoding": held} if held else {})}}


def _reopen(path: str, request: dict, options: dict | None, mode: str) -> CacheWriter:
    """The cache as a writer; refused when it answers another extraction request (the normal check)."""
    try:
        return CacheWriter.reopen(path, request, options, mode)
    except CacheMismatch as err:
        raise CacheMismatch(path, err.diffs, "fill it with the config and device it was extracted with, or "
                            "re-extract it with `satdifuser extract CONFIG --overwrite`") from None


def _check_complete(cache: FeatureCache) -> None:
    if not cache.complete:
        raise CacheError(f"cache {cache.path} is incomplete ({int(cache.done.sum())} of {len(cache)} samples "
                         f"extracted); finish it with `satdifuser extract CONFIG --store {','.join(cache.tiers)}`, "
                         "then fill it from its trajectory")


def _mend(fill: CacheWriter) -> None:
    """Clear the marks of filled shards whose stored objects are gone (deleted by hand, say)."""
    lacking = lacking_objects(fill.root, fill.plan, fill.done_shards(), fill.array_paths())
    if lacking:
        log.warning("%s: %d filled shard(s) lack stored objects; filling them again: %s", fill.path, len(lacking),
                    sorted(lacking))
        fill.clear_done(lacking)


def _fill(batch_size: int, extractor: FeatureExtractor, cache: FeatureCache, fill: CacheWriter, adding, progress: bool,
          lock: WriterLock) -> tuple[int, float]:
    """Fill every pending shard; returns (images computed, seconds)."""
    from tqdm.auto import tqdm

    plan, layers = fill.plan, list(fill.plan.layer_shapes)
    shards = fill.pending_shards()
    todo = sum(plan.shard_range(s)[1] - plan.shard_range(s)[0] for s in shards)
    started = time.perf_counter()
    with tqdm(total=todo, desc=f"fill {fill.path}", unit="img", disable=not progress) as bar:
        for shard in shards:
            start, stop = plan.shard_range(shard)
            shard_started, buffer = time.perf_counter(), ShardBuffer(stop - start)
            for idx in shard_batches(plan, [shard], batch_size):
                maps, pooled = extractor.from_trajectory(cache.trajectory(idx), layers, pooled="pooled" in adding)
                buffer.add(shard_arrays(plan, {"features": maps, "pooled": pooled}, adding))
                bar.update(len(idx))
            n = stop - start
            work = {"unet_passes": n * len(plan.timesteps), "vae_passes": 0, "images_filled": n,
                    "fill_seconds": time.perf_counter() - shard_started}
            write_and_count(fill, shard, buffer.arrays, work, lock)
    return todo, time.perf_counter() - started
