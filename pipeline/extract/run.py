"""Extract the splits of a task into their feature caches, resuming where an earlier run stopped."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import __version__
from ..backbone.loader import BackboneSpec, fingerprint, load_diffusionsat, read_scheduler_config
from ..backbone.schedule import Schedule, label_key
from ..cache import encoding
from ..cache.layout import (
    ATTRS_KEY,
    EXACT_ENCODING,
    CachePlan,
    array_specs,
    ordered_tiers,
    shard_arrays,
)
from ..cache.lock import WriterLock
from ..cache.planning import check_room
from ..cache.reader import lacking_tiers
from ..cache.store import CacheError, CacheMismatch, check_location, is_url
from ..cache.writer import CacheWriter, lacking_objects
from ..config import Config, ConfigError
from ..data.geobench_task import GeoBenchSplit, TaskSource, collate
from ..device import resolve_device
from ..errors import UserError
from .extractor import EXTRACTION_VERSION, BatchFeatures, ExtractionSettings, FeatureExtractor, precision

log = logging.getLogger(__name__)


def backbone_spec(cfg: Config) -> BackboneSpec:
    return BackboneSpec(
        root=cfg.pretrained_model_name_or_path, img_size=cfg.img_size,
        resolution_subfolder=cfg.resolution_subfolder, unet_subfolder=cfg.unet_subfolder,
        use_metadata=cfg.use_metadata, num_metadata=cfg.num_metadata,
    )


def check_backbone(cfg: Config, caches, have: str | None = None) -> None:
    """Refuse caches whose trajectory another backbone computed: its x_t through this config's UNet
    would give features of neither. ``have`` is the config's backbone id when already known."""
    have = have or fingerprint(backbone_spec(cfg))["id"]
    for cache in caches:
        built = cache.request.get("backbone", {}).get("id")
        if built != have:
            raise CacheError(f"cache {cache.path} was built from backbone {built}, but {cfg.config_file} names "
                             f"{cfg.pretrained_model_name_or_path} (backbone {have}); set pretrained_model_name_or_path "
                             "to the backbone the cache was built from, or re-extract with `satdifuser extract CONFIG "
                             "--overwrite`")


def extraction_settings(cfg: Config) -> ExtractionSettings:
    return ExtractionSettings(
        mode=cfg.diffusion_mode, num_timesteps=cfg.num_timesteps, save_timesteps=tuple(cfg.save_timesteps),
        layer_idxs=cfg.layer_idxs, prompt=cfg.prompt, latent=cfg.latent, seed=cfg.seed,
        autocast=cfg.autocast, metadata=tuple(cfg.metadata) if cfg.metadata else None,
    )


def extraction_request(cfg: Config, schedule: Schedule, device: torch.device) -> dict:
    """The extraction half of a cache's provenance: what decides the numbers it holds.

    A lossy ``map_encoding`` is part of it (its maps are other numbers); the exact one is left out,
    so caches written before encodings existed answer the same request. The tiers are not: they
    are what a cache holds (its plan), and a cache holding more than asked serves the request.
    """
    request = {
        "version": EXTRACTION_VERSION,
        "mode": cfg.diffusion_mode,
        "num_timesteps": cfg.num_timesteps,
        "save_timesteps": list(cfg.save_timesteps),
        "unet_timesteps": schedule.table(),
        "layer_idxs": cfg.layer_idxs,
        "prompt": cfg.prompt,
        "img_size": cfg.img_size,
        "latent": cfg.latent,
        "seed": cfg.seed,
        "metadata": list(cfg.metadata) if cfg.use_metadata and cfg.metadata else None,
        "precision": precision(device, cfg.autocast),
        "feature_dtype": "float16",
        "codec": cfg.codec,
        "shard_size": cfg.shard_size,
    }
    if cfg.map_encoding != EXACT_ENCODING:
        request["map_encoding"] = cfg.map_encoding
    return request


@dataclass
class ExtractResult:
    path: str
    num_samples: int
    extracted: int  # images computed in this run (0 when the cache was complete)
    seconds: float
    unet_passes: int
    vae_passes: int
    write_seconds: float = 0.0  # spent writing shards, in the background thread
    write_wait_seconds: float = 0.0  # of which the computation waited for (the write's real cost)
    # Work and map error sums the run left out of the store's attributes (``record=False``), for
    # the process that records them.
    unrecorded: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


def rate_text(images: int, seconds: float) -> str:
    """Images per second, or seconds per image when that is below one: a slow run never reads
    as "0.0 img/s"."""
    if images <= 0 or seconds <= 0:
        return "no images timed"
    rate = images / seconds
    return f"{rate:.1f} img/s" if rate >= 1 else f"{seconds / images:.1f} s/img"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(asked: int) -> int:
    """``num_workers`` capped to the usable cores: more worker processes than cores only compete
    with the extraction for them (the reference's 4 on 2 cores made it several times slower)."""
    cores = usable_cores()
    if asked > cores:
        log.warning("num_workers %d is more than the %d CPU core(s) this process may use; using %d loader workers",
                    asked, cores, cores)
        return cores
    return asked


class Extraction:
    """One config on one device: the backbone is hashed once and loaded once, when first needed."""

    def __init__(self, cfg: Config, device: str | None = None, storage_options: dict | None = None):
        self.cfg = cfg
        self.device = resolve_device(device or cfg.device)
        self.spec = backbone_spec(cfg)
        self.schedule = Schedule.build(
            read_scheduler_config(self.spec), cfg.num_timesteps, cfg.save_timesteps, cfg.diffusion_mode
        )
        self.source = TaskSource.from_config(cfg)
        self.storage_options = storage_options
        self._fingerprint = None
        self._extractor = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            model = load_diffusionsat(self.spec, self.device)
            self._extractor = FeatureExtractor(model, extraction_settings(self.cfg))
        return self._extractor

    def request(self, dataset: GeoBenchSplit) -> dict:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.spec)
        extraction = extraction_request(self.cfg, self.schedule, self.device)
        return {"backbone": self._fingerprint, "extraction": extraction, "dataset": dataset.provenance()}

    def run(self, split: str, path: str | None = None, overwrite: bool = False,
            replace_mismatched: bool = False, progress: bool = True, repair: bool = False,
            wait: bool = False) -> ExtractResult:
        """Fill ``path`` (default ``cfg.cache_path(split)``) with the features of one split.

        A cache built for the same request is resumed; one built for another request is refused
        (CacheMismatch naming the differing keys) unless ``overwrite``, or ``replace_mismatched``
        and the difference is not only the device: a partial cache made on a GPU is never
        thrown away because the resuming machine has none. A shard marked done is trusted only
        when all its stored objects are there; ``repair`` also re-extracts the shards `cache
        verify` finds damaged. One extraction writes a store at a time: another one is refused
        with its holder named, or waited for with ``wait``. A complete cache is left as it is
        without writing anything, so it may lie on read-only media.
        """
        path, dataset, request = self.split_request(split, path)
        if not self.needs_writing(path, dataset, request, overwrite, replace_mismatched, repair):
            return ExtractResult(path, len(dataset), 0, 0.0, 0, 0)
        with WriterLock(path, self.storage_options, wait=wait) as lock:
            writer = self.open_writer(path, dataset, request, overwrite, replace_mismatched, repair)
            if not writer.pending_shards():
                return ExtractResult(path, len(dataset), 0, 0.0, 0, 0)
            return _run(self.cfg, dataset, self.extractor, writer, progress, lock)

    def split_request(self, split: str, path: str | None) -> tuple[str, GeoBenchSplit, dict]:
        """The store path of ``split``, its samples and the request a cache of them answers."""
        cfg = self.cfg
        path = path or cfg.cache_path(split)
        check_location(path, writing=True)
        dataset = GeoBenchSplit(self.source, split)
        if len(dataset) == 0:
            raise ConfigError(f"{cfg.config_file}: split {split!r} of {cfg.dataset_name} has no samples")
        return path, dataset, self.request(dataset)

    def needs_writing(self, path: str, dataset: GeoBenchSplit, request: dict, overwrite: bool,
                      replace_mismatched: bool, repair: bool) -> bool:
        """False when the cache is complete; else checks that ``path`` can take the shards still to write."""
        if not (overwrite or repair) and self._complete(path, request, replace_mismatched):
            log.info("cache %s is complete; nothing to extract", path)
            return False
        _check_writable(path)
        check_room(self.cfg, path, dataset, replace=overwrite)
        return True

    def open_writer(self, path: str, dataset: GeoBenchSplit, request: dict, overwrite: bool,
                    replace_mismatched: bool, repair: bool) -> CacheWriter:
        """The writer of the store at ``path``, reopened and mended or created; the lock is held."""
        writer = None if overwrite else self._reopen(path, request, replace_mismatched, "r+")
        if writer is not None:
            check_store_writable(writer)
            _mend(writer, repair, self.storage_options)
        if writer is None:
            info = {"code_version": __version__, "unet_passes_per_image": self.schedule.unet_passes,
                    "layer_catalog": self.extractor.catalog}
            writer = CacheWriter.create(path, request, self._plan(dataset), info, self.storage_options)
        return writer

    def fill_from_trajectory(self, split: str, path: str | None = None, tiers=None, progress: bool = True,
                             wait: bool = False):
        """Add maps and/or pooled vectors to a complete cache from its trajectory (``pipeline.extract.fill``)."""
        from .fill import fill_from_trajectory

        return fill_from_trajectory(self, split, path, tiers, progress, wait)

    def _reopen(self, path: str, request: dict, replace_mismatched: bool, mode: str) -> CacheWriter | None:
        """The cache at ``path`` built for ``request`` and holding the tiers of ``store``; None when there
        is none or it is to be replaced."""
        try:
            writer = CacheWriter.reopen(path, request, self.storage_options, mode)
        except CacheMismatch as err:
            if not replace_mismatched or all(d.startswith("extraction.precision") for d in err.diffs):
                raise CacheMismatch(path, err.diffs, "pass --overwrite to rebuild it, or run on the device "
                                    "it was built with (--device, or params.yaml extract.device)") from None
            if mode != "r":  # said once, by the run that replaces it
                log.warning("replacing %s, built with other settings: %s", path, "; ".join(err.diffs))
            return None
        if writer is None:
            return None
        lacking = [t for t in ordered_tiers(self.cfg.store) if not writer.plan.holds(t)]
        if not lacking:
            return writer
        if not replace_mismatched:
            raise lacking_tiers(path, writer.plan.tiers, lacking, f"store {','.join(ordered_tiers(self.cfg.store))}")
        if mode != "r":
            log.warning("replacing %s, which holds the tiers %s, not %s", path, list(writer.plan.tiers), lacking)
        return None

    def _complete(self, path: str, request: dict, replace_mismatched: bool) -> bool:
        """Whether the cache at ``path`` holds every shard of ``request``, checked without writing."""
        writer = self._reopen(path, request, replace_mismatched, "r")
        return bool(writer is not None and not writer.pending_shards()
                    and not lacking_objects(writer.root, writer.plan, writer.done_shards()))

    def _plan(self, dataset: GeoBenchSplit) -> CachePlan:
        cfg = self.cfg
        first = dataset[0]
        size = cfg.img_size
        if tuple(first["image"].shape) != (3, size, size):
            raise ConfigError(
                f"{cfg.dataset_name}: images become {tuple(first['image'].shape[1:])} at img_size {size}; "
                "extraction needs square images"
            )
        latent = size // 8
        return CachePlan(
            num_samples=len(dataset), shard_size=cfg.shard_size,
            timesteps=tuple(label_key(s) for s in cfg.save_timesteps),
            layer_shapes=self.extractor.layer_shapes(latent), latent_shape=(4, latent, latent),
            label_shape=tuple(first["label"].shape), label_dtype=str(first["label"].dtype), codec=cfg.codec,
            tiers=ordered_tiers(cfg.store), map_encoding=cfg.map_encoding,
        )


def extract_split(cfg: Config, split: str, device: str | None = None, overwrite: bool = False,
                  path: str | None = None, storage_options: dict | None = None,
                  progress: bool = True, replace_mismatched: bool = False) -> ExtractResult:
    """One split; see ``Extraction.run``."""
    return Extraction(cfg, device, storage_options).run(split, path, overwrite, replace_mismatched, progress)


def _check_writable(path: str) -> None:
    """Fail before the backbone is loaded when a local cache folder cannot be written."""
    if is_url(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {parent}: {err.strerror}; set cache_dir elsewhere") from None
    if not os.access(parent, os.W_OK):
        raise CacheError(f"the cache folder {parent} is not writable; set cache_dir elsewhere")


def check_store_writable(writer: CacheWriter) -> None:
    """Fail before any shard is computed when an existing local store cannot take the writes a
    shard makes: its root, every array's folder and its chunk folder, and a file in the root."""
    if is_url(writer.path):
        return
    folders = [writer.path] + [os.path.join(writer.path, spec.name, sub) for spec in array_specs(writer.plan)
                               for sub in ("", "c")]
    for folder in folders:
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            raise CacheError(f"cache {writer.path} is not writable ({folder}); make it writable or extract "
                             "elsewhere (cache_dir)")
    try:
        with tempfile.TemporaryFile(dir=writer.path):
            pass
    except OSError as err:
        raise CacheError(f"cache {writer.path} is not writable ({err.strerror}); make it writable or extract "
                         "elsewhere (cache_dir)") from None


def _mend(writer: CacheWriter, repair: bool, storage_options: dict | None) -> None:
    """Clear the done marks the store cannot back: shards lacking stored objects (a listing), and
    with ``repair`` every shard `cache verify` finds damaged; extraction then redoes them."""
    restored = writer.restore_arrays()
    if restored:
        log.warning("%s lacked %d array(s) (e.g. %s); created them empty, and the shards they held are extracted "
                    "again", writer.path, len(restored), restored[0])
    lacking = lacking_objects(writer.root, writer.plan, writer.done_shards())
    if lacking:
        first = next(iter(lacking.values()))[0]
        log.warning("%s: %d shard(s) marked done lack stored objects (e.g. %s); extracting them again: %s",
                    writer.path, len(lacking), first, sorted(lacking))
        writer.clear_done(lacking)
    if not repair:
        return
    from ..cache.audit import audit
    from ..cache.reader import open_cache

    problems = audit(open_cache(writer.path, storage_options))
    whole = [p.text for p in problems if not p.shards]
    if whole:
        raise CacheError(f"cache {writer.path} cannot be repaired shard by shard ({whole[0]}); rebuild it with --overwrite")
    damaged = sorted({s for p in problems for s in p.shards} - set(writer.pending_shards()))
    if damaged:
        log.warning("%s: `cache verify` finds %d damaged shard(s); extracting them again: %s",
                    writer.path, len(damaged), damaged)
        writer.clear_done(damaged)


class ShardBuffer:
    """The arrays of one shard, filled in place batch by batch: keeping the batches and
    concatenating them at the end held the shard twice (at 256 px a 64-image shard is 1.3 GiB of
    maps, and extraction peaked at 3.2 times that)."""

    def __init__(self, rows: int):
        self.rows, self.filled = rows, 0
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(next(iter(batch.values())))
        for key, values in batch.items():
            values = np.asarray(values)
            if key not in self.arrays:
                self.arrays[key] = np.empty((self.rows, *values.shape[1:]), values.dtype)
            self.arrays[key][self.filled:self.filled + n] = values
        self.filled += n

    @property
    def full(self) -> bool:
        return self.filled == self.rows


def batch_arrays(plan: CachePlan, part: BatchFeatures, labels: np.ndarray, names: list[str]) -> dict:
    """One batch's rows of the shard arrays for the tiers ``plan`` holds; maps exact (the writer
    encodes them)."""
    return shard_arrays(plan, {"labels": labels, "sample_names": np.asarray(names, dtype=object), "latents": part.latents,
                               "trajectory": part.trajectory, "features": part.maps, "pooled": part.pooled})


def shard_batches(plan: CachePlan, shards: list[int], batch_size: int) -> list[list[int]]:
    """Index batches that never cross a shard boundary."""
    out = []
    for shard in shards:
        start, stop = plan.shard_range(shard)
        out += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return out


def write_and_count(writer: CacheWriter, shard: int, arrays: dict, work: dict, lock: WriterLock,
                    unrecorded: dict | None = None) -> float:
    """Write a shard with its work for the ledger (counted before it is marked done, so a kill never
    loses the count); returns the seconds it took. With ``unrecorded`` the work and map errors are
    added to it instead of the store's attributes."""
    start = time.perf_counter()
    lock.check()
    if unrecorded is None:
        writer.write_shard(shard, arrays, work, before_done=lock.check)
    else:
        errors = writer.write_shard(shard, arrays, work, before_done=lock.check, record=False)
        add_unrecorded(unrecorded, {"work": work, "map_error": errors})
    return time.perf_counter() - start


def add_unrecorded(total: dict, part: dict) -> None:
    """Add one run's (or shard's) ``work`` and ``map_error`` sums into ``total``."""
    work, sums = total.setdefault("work", {}), total.setdefault("map_error", {})
    for key, value in part.get("work", {}).items():
        work[key] = work.get(key, 0) + value
    for key, value in part.get("map_error", {}).items():
        sums[key] = encoding.add_errors(sums.get(key), value)


def record_size(writer: CacheWriter) -> None:
    """Put the bytes the store holds into its ledger and consolidate its metadata: the last write
    of a run (a later attribute write drops the consolidated copy)."""
    ledger = dict(writer.root.attrs[ATTRS_KEY]["ledger"])
    ledger["bytes_stored"] = sum(int(writer.root[name].nbytes_stored()) for name in writer.array_paths() + ["done"])
    writer.update_info(ledger=ledger)
    writer.consolidate()


def _run(cfg: Config, dataset, extractor: FeatureExtractor, writer: CacheWriter, progress: bool,
         lock: WriterLock, shards: list[int] | None = None, record: bool = True) -> ExtractResult:
    """Extract ``shards`` (default: every shard not done) into ``writer``. Without ``record`` the
    store's attributes are not written: the work and map errors are returned in ``unrecorded``."""
    from tqdm.auto import tqdm

    plan = writer.plan
    shards = writer.pending_shards() if shards is None else shards
    unrecorded = None if record else {}
    batches = shard_batches(plan, shards, cfg.extract_batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=loader_workers(cfg.num_workers), collate_fn=collate)
    todo = sum(len(b) for b in batches)
    passes = extractor.unet_passes(plan.tiers)
    shard_iter = iter(shards)
    shard = next(shard_iter)
    buffer = ShardBuffer(len(range(*plan.shard_range(shard))))
    started = shard_started = time.perf_counter()
    write_seconds = wait_seconds = 0.0
    # One shard is written in the background while the next is computed; waiting for it before
    # handing over the next keeps memory at two shards.
    with tqdm(total=todo, desc=f"extract {writer.path}", unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as background:
        pending = None
        for batch in loader:
            problems = [e for e in batch["label_error"] if e]
            if problems:
                raise UserError(problems[0])
            part = extractor(batch["image"], batch["name"], plan.tiers)
            buffer.add(batch_arrays(plan, part, batch["label"], batch["name"]))
            del part
            bar.update(len(batch["name"]))
            if buffer.full:
                if pending is not None:
                    waited = time.perf_counter()
                    write_seconds += pending.result()
                    wait_seconds += time.perf_counter() - waited
                n, now = buffer.rows, time.perf_counter()
                work = {"unet_passes": n * passes, "vae_passes": n, "images_extracted": n,
                        "extract_seconds": now - shard_started}
                shard_started = now
                pending = background.submit(write_and_count, writer, shard, buffer.arrays, work, lock, unrecorded)
                shard = next(shard_iter, None)
                if shard is not None:
                    buffer = ShardBuffer(len(range(*plan.shard_range(shard))))
        if pending is not None:
            waited = time.perf_counter()
            write_seconds += pending.result()
            wait_seconds += time.perf_counter() - waited
    seconds = time.perf_counter() - started
    if record:  # else the process that records the other ranks' work finishes the store
        record_size(writer)
    return ExtractResult(writer.path, plan.num_samples, todo, seconds, todo * passes, todo, write_seconds, wait_seconds,
                         unrecorded or {})
