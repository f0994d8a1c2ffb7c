"""Extract one split of a task into its feature cache, resuming where an earlier run stopped."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .backbone.extractor import BatchFeatures, ExtractionSettings, FeatureExtractor
from .backbone.loader import BackboneSpec, fingerprint, load_diffusionsat, read_scheduler_config
from .backbone.schedule import Schedule, label_key
from .cache.layout import ATTRS_KEY, CachePlan, feature_path, pooled_path, trajectory_path
from .cache.store import CacheMismatch
from .cache.writer import CacheWriter
from .config import Config, ConfigError
from .data.geobench_task import GeoBenchSplit, TaskSource, collate

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def backbone_spec(cfg: Config) -> BackboneSpec:
    return BackboneSpec(
        root=cfg.pretrained_model_name_or_path, img_size=cfg.img_size,
        resolution_subfolder=cfg.resolution_subfolder, unet_subfolder=cfg.unet_subfolder,
        use_metadata=cfg.use_metadata, num_metadata=cfg.num_metadata,
    )


def extraction_settings(cfg: Config) -> ExtractionSettings:
    return ExtractionSettings(
        mode=cfg.diffusion_mode, num_timesteps=cfg.num_timesteps, save_timesteps=tuple(cfg.save_timesteps),
        layer_idxs=cfg.layer_idxs, prompt=cfg.prompt, latent=cfg.latent, seed=cfg.seed,
        autocast=cfg.autocast, metadata=tuple(cfg.metadata) if cfg.metadata else None,
    )


def precision(cfg: Config, device: torch.device) -> str:
    return f"{cfg.autocast}-autocast" if device.type == "cuda" and cfg.autocast != "none" else "fp32"


def extraction_request(cfg: Config, schedule: Schedule, device: torch.device) -> dict:
    """The extraction half of a cache's provenance: what decides the numbers it holds."""
    return {
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
        "precision": precision(cfg, device),
        "feature_dtype": "float16",
        "codec": cfg.codec,
        "shard_size": cfg.shard_size,
    }


@dataclass
class ExtractResult:
    path: str
    num_samples: int
    extracted: int  # images computed in this run (0 when the cache was complete)
    seconds: float
    unet_passes: int
    vae_passes: int

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


def _shard_arrays(parts: list[BatchFeatures], labels: list[np.ndarray], names: list[str]) -> dict:
    arrays = {"latents": torch.cat([p.latents for p in parts]).numpy(),
              "labels": np.concatenate(labels), "sample_names": np.asarray(names, dtype=object)}
    for t in parts[0].maps:
        arrays[trajectory_path(t)] = torch.cat([p.trajectory[t] for p in parts]).numpy()
        for layer in parts[0].maps[t]:
            arrays[feature_path(t, layer)] = torch.cat([p.maps[t][layer] for p in parts]).numpy()
            arrays[pooled_path(t, layer)] = torch.cat([p.pooled[t][layer] for p in parts]).numpy()
    return arrays


def _batches(plan: CachePlan, shards: list[int], batch_size: int) -> list[list[int]]:
    """Index batches that never cross a shard boundary."""
    out = []
    for shard in shards:
        start, stop = plan.shard_range(shard)
        out += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return out


def _plan(cfg: Config, dataset: GeoBenchSplit, extractor: FeatureExtractor) -> CachePlan:
    first = dataset[0]
    latent = cfg.img_size // 8
    return CachePlan(
        num_samples=len(dataset), shard_size=cfg.shard_size,
        timesteps=tuple(label_key(s) for s in cfg.save_timesteps),
        layer_shapes=extractor.layer_shapes(latent), latent_shape=(4, latent, latent),
        label_shape=tuple(first["label"].shape), label_dtype=str(first["label"].dtype), codec=cfg.codec,
    )


def extract_split(cfg: Config, split: str, device: str | None = None, overwrite: bool = False,
                  path: str | None = None, storage_options: dict | None = None,
                  progress: bool = True, replace_mismatched: bool = False) -> ExtractResult:
    """Fill ``path`` (default ``cfg.cache_path(split)``) with the features of one split.

    An existing cache built for the same request is resumed; one built for another request is
    refused (CacheError naming the differing keys) unless ``overwrite`` or ``replace_mismatched``.
    """
    path = path or cfg.cache_path(split)
    dev = resolve_device(device or cfg.device)
    dataset = GeoBenchSplit(TaskSource.from_config(cfg), split)
    if len(dataset) == 0:
        raise ConfigError(f"{cfg.source}: split {split!r} of {cfg.dataset_name} has no samples")
    spec = backbone_spec(cfg)
    settings = extraction_settings(cfg)
    schedule = Schedule.build(read_scheduler_config(spec), cfg.num_timesteps, cfg.save_timesteps, cfg.diffusion_mode)
    request = {"backbone": fingerprint(spec), "extraction": extraction_request(cfg, schedule, dev),
               "dataset": dataset.provenance()}

    writer = None
    if not overwrite:
        try:
            writer = CacheWriter.reopen(path, request, storage_options)
        except CacheMismatch as err:
            if not replace_mismatched:
                raise
            log.warning("replacing %s, built with other settings: %s", path, "; ".join(err.diffs))
    if writer is not None and not writer.pending_shards():
        log.info("cache %s is complete; nothing to extract", path)
        return ExtractResult(path, len(dataset), 0, 0.0, 0, 0)

    extractor = FeatureExtractor(load_diffusionsat(spec, dev), settings)
    if writer is None:
        info = {"code_version": __version__, "timestep_table": schedule.table(),
                "unet_passes_per_image": schedule.unet_passes}
        writer = CacheWriter.create(path, request, _plan(cfg, dataset, extractor), info, storage_options)
    return _run(cfg, dataset, extractor, writer, progress)


def _run(cfg: Config, dataset, extractor: FeatureExtractor, writer: CacheWriter, progress: bool) -> ExtractResult:
    from tqdm.auto import tqdm

    plan = writer.plan
    shards = writer.pending_shards()
    batches = _batches(plan, shards, cfg.extract_batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=collate)
    todo = sum(len(b) for b in batches)
    bar = tqdm(total=todo, desc=f"extract {writer.path}", unit="img", disable=not progress)
    parts, labels, names = [], [], []
    shard_iter = iter(shards)
    shard = next(shard_iter)
    started = time.perf_counter()
    # One shard is written in the background while the next is computed; waiting for it before
    # handing over the next keeps memory at two shards.
    with ThreadPoolExecutor(max_workers=1) as background:
        pending = None
        for batch in loader:
            parts.append(extractor(batch["image"], batch["name"]))
            labels.append(batch["label"])
            names += batch["name"]
            bar.update(len(batch["name"]))
            start, stop = plan.shard_range(shard)
            if len(names) == stop - start:
                if pending is not None:
                    pending.result()
                pending = background.submit(writer.write_shard, shard, _shard_arrays(parts, labels, names))
                parts, labels, names = [], [], []
                shard = next(shard_iter, None)
        if pending is not None:
            pending.result()
    bar.close()
    seconds = time.perf_counter() - started
    passes = todo * extractor.schedule.unet_passes
    ledger = writer.root.attrs[ATTRS_KEY].get("ledger", {})
    writer.update_info(ledger={
        "unet_passes": ledger.get("unet_passes", 0) + passes,
        "vae_passes": ledger.get("vae_passes", 0) + todo,
        "images_extracted": ledger.get("images_extracted", 0) + todo,
        "extract_seconds": round(ledger.get("extract_seconds", 0.0) + seconds, 3),
    })
    return ExtractResult(writer.path, plan.num_samples, todo, seconds, passes, todo)
