"""`satdifuser fit`: train a fuser + head on features from the cache and write the outputs.

The features come from one of three sources (``source``): the cache's stored maps; maps
recomputed from the cache's stored trajectory (the UNet input x_t of each saved label), one UNet
pass per label and batch; or, ``live``, the images through the whole backbone for every batch, as
the reference does. All three serve the same batches in the same order.

Outputs in ``out_dir``: ``metrics.json`` (numbers only: val and test of the best model, its
``test_score``, epochs, seconds, passes), ``run.json`` (what the run was: task, fuser, partition,
seed, source, the config, per-class values and confusion matrices, the cost ledger, and the
digest of its inputs that ``pipeline.fit.grid`` compares), ``model/`` (config.json +
model.safetensors), ``training_state.pt`` (``pipeline.fit.resume``), ``history.csv`` and the plots of
``pipeline.plots`` (PNG and CSV for DVC). They are written into a partial folder beside it and
swapped in at the end (``pipeline.outputs``), so a stopped fit leaves the previous output as it was.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..cache.batches import CacheBatches, batch_order
from ..cache.reader import FeatureCache, open_cache
from ..cache.store import CacheError
from ..config import Config, ConfigError
from ..errors import UserError
from ..model import FusionModel
from .loop import Splits, evaluate, feature_selection, model_config, train

log = logging.getLogger(__name__)

# What a cache must share with the experiment for its features to be the ones asked for. The
# latent seed is not among them: training seeds vary over one cache (its own seed is recorded).
EXTRACTION_KEYS = ("mode", "num_timesteps", "prompt", "img_size", "latent")
# What a fit writes into its output folder (which it replaces whole).
FIT_OUTPUTS = {"metrics.json", "run.json", "history.csv", "model", "plots", "training_state.pt"}
SOURCES = ("maps", "trajectory", "live")
# The code a fit's numbers depend on, as dvc.yaml's fit stage lists it (a test keeps the two equal);
# its digest is one of a run's inputs, so a run of other code is never taken for done.
FIT_CODE = ("pipeline/__init__.py", "pipeline/config.py", "pipeline/device.py", "pipeline/errors.py", "pipeline/partitions.py",
            "pipeline/fit/run.py", "pipeline/fit/loop.py", "pipeline/fit/resume.py", "pipeline/outputs.py",
            "pipeline/model.py", "pipeline/metrics.py", "pipeline/plots.py", "pipeline/extract/run.py",
            "pipeline/extract/extractor.py", "pipeline/data/geobench_task.py",
            "pipeline/backbone", "pipeline/fusion", "pipeline/heads", "pipeline/cache")
# Settings of the config that say where things are, not what the fit computes.
LOCATION_KEYS = ("config_file", "cache_dir", "geobench_dir", "pretrained_model_name_or_path", "exp_folder",
                 "resume_from", "device")


def expected_request(cfg: Config, split: str) -> dict:
    """The part of a cache's provenance that the experiment decides without the backbone or the
    images: the extraction settings, and which samples of which task, read how."""
    from ..data.geobench_task import scaling_text, task_settings

    extraction = {k: getattr(cfg, {"mode": "diffusion_mode"}.get(k, k)) for k in EXTRACTION_KEYS}
    extraction["metadata"] = list(cfg.metadata) if cfg.use_metadata and cfg.metadata else None
    dataset = {"name": cfg.dataset_name, "split": split, "partition": cfg.partition, "task": cfg.task,
               "num_classes": cfg.num_classes}
    task, bands, scale = task_settings(cfg)
    dataset.update({k: v for k, v in (("geobench_task", task), ("bands", bands and list(bands)),
                                      ("scaling", scale and scaling_text(scale))) if v})
    return {"extraction": extraction, "dataset": dataset}


def open_split_caches(cfg: Config) -> dict[str, FeatureCache]:
    return {split: open_cache(cfg.cache_path(split), expect=expected_request(cfg, split))
            for split in ("train", "val", "test")}


def training_rows(names, fraction: float | None, seed: int) -> np.ndarray:
    """The training rows ``limited_label`` keeps: round(fraction x N) images (at least one), those
    whose SHA-256 of (seed, sample name) is smallest, in row order. The draw depends on the names and
    the seed only, not on row or batch order, and a smaller fraction keeps a subset of a larger one's."""
    if fraction is None:
        return np.arange(len(names))
    keys = [hashlib.sha256(f"{seed}:{name}".encode()).digest() for name in names]
    keep = sorted(range(len(names)), key=keys.__getitem__)[: max(1, round(fraction * len(names)))]
    return np.sort(np.array(keep, dtype=np.int64))


def partition_rows(cfg: Config, train: FeatureCache) -> np.ndarray:
    """Rows of the train cache that ``train_partition`` names, found by sample name, in row order; all
    rows when it is the partition the cache was extracted from."""
    if cfg.train_partition == cfg.partition:
        return np.arange(len(train))
    from ..config import geobench_root
    from ..data.geobench_task import task_settings
    from ..partitions import partition_indices

    task = task_settings(cfg)[0]
    if not task:
        raise ConfigError(f"{cfg.config_file}: train_partition {cfg.train_partition!r} is read from the dataset's "
                          f"GEO-Bench folder, but {cfg.dataset_name!r} names none; set geobench_task in its task file")
    rows = partition_indices(geobench_root(cfg) / task, cfg.train_partition, train, flag="train_partition",
                             hint="set geobench_dir (or GEO_BENCH_DIR) to the GEO-Bench root that holds the task")
    return np.unique(rows)


def fit_source(cfg: Config, caches: dict, asked: str | None = None) -> str:
    """Where a fit takes its features: ``asked``, else the config's ``source``, else the maps when
    the train cache holds them and the trajectory when it holds that; refused in one line when a
    split's cache cannot serve it."""
    source = asked or cfg.source
    if source is None:
        source = next((tier for tier in ("maps", "trajectory") if caches["train"].plan.holds(tier)), "maps")
    if source not in SOURCES:
        raise ConfigError(f"source {source!r} is not one of {list(SOURCES)}")
    if source != "live":
        for cache in caches.values():
            cache.require(source, f"a fit with source {source}")
    if source == "maps":
        for cache in caches.values():
            check_encoding(cfg, cache)
    return source


def check_encoding(cfg: Config, cache: FeatureCache) -> None:
    """Refuse maps stored in another encoding than the config names: a lossy cache read by an exact
    config (or the reverse) would give other numbers than the ones asked for, without a word."""
    if cache.map_encoding != cfg.map_encoding:
        raise CacheError(f"cache {cache.path} stores its maps as {cache.map_encoding}, but {cfg.config_file} has "
                         f"map_encoding {cfg.map_encoding}; set map_encoding: {cache.map_encoding} to use these maps "
                         f"(`satdifuser cache info {cache.path}` shows their error), or fit with --source trajectory "
                         "for exact features")


def cached_splits(cfg: Config, caches: dict, timesteps, layers, train_rows=None) -> Splits:
    """Batches of each split's cache; ``train_rows`` are the training images to use (all when None)."""
    train_rows = np.arange(len(caches["train"])) if train_rows is None else train_rows

    def batches(split, shuffle):
        src = CacheBatches(caches[split], cfg.batch_size if split == "train" else cfg.val_batch_size,
                           timesteps, layers, shuffle=shuffle, seed=cfg.seed, buffer_shards=cfg.shuffle_buffer_shards,
                           indices=train_rows if split == "train" else None)
        src.preload = src.nbytes() <= cfg.preload_max_gb * 2**30
        return src.epoch

    return Splits(batches("train", True), batches("val", False), batches("test", False), len(train_rows))


def trajectory_splits(cfg: Config, caches: dict, timesteps, layers, device, train_rows=None) -> Splits:
    """Maps recomputed on ``device`` from each batch's stored trajectory, one UNet pass per timestep
    stopped after the last layer used, in the batches and order of ``cached_splits``."""
    from ..backbone.loader import load_diffusionsat
    from ..extract.extractor import FeatureExtractor
    from ..extract.run import backbone_spec, extraction_settings

    extractor = FeatureExtractor(load_diffusionsat(backbone_spec(cfg), device), extraction_settings(cfg))
    train_rows = np.arange(len(caches["train"])) if train_rows is None else train_rows

    def batches(split, shuffle):
        cache = caches[split]
        order = CacheBatches(cache, cfg.batch_size if split == "train" else cfg.val_batch_size, timesteps, layers,
                             shuffle=shuffle, seed=cfg.seed, buffer_shards=cfg.shuffle_buffer_shards,
                             indices=train_rows if split == "train" else None).order

        def epoch(e):
            for idx in order(e):
                maps, _ = extractor.from_trajectory(cache.trajectory(idx, timesteps), layers, on_device=True)
                yield maps, cache.labels(idx), idx

        return epoch

    return Splits(batches("train", True), batches("val", False), batches("test", False), len(train_rows))


def live_splits(cfg: Config, timesteps, layers, device, shard_size: int | None = None, train_rows=None) -> Splits:
    """Features recomputed from the images for every batch (the reference's way). ``shard_size``
    (the train cache's) makes shard-aligned shuffling pick the batches a cached fit picks;
    ``train_rows`` are the training images to use (all when None)."""
    from ..backbone.loader import load_diffusionsat
    from ..data.geobench_task import GeoBenchSplit, TaskSource, collate
    from ..extract.extractor import FeatureExtractor
    from ..extract.run import backbone_spec, extraction_settings

    extractor = FeatureExtractor(load_diffusionsat(backbone_spec(cfg), device), extraction_settings(cfg))
    source = TaskSource.from_config(cfg)

    def batches(split, shuffle):
        data = GeoBenchSplit(source, split)
        size = cfg.batch_size if split == "train" else cfg.val_batch_size
        rows = train_rows if split == "train" and train_rows is not None else np.arange(len(data))

        def epoch(e):
            for idx in batch_order(rows, size, shuffle, cfg.seed, e, shard_size or cfg.shard_size,
                                   cfg.shuffle_buffer_shards):
                batch = collate([data[int(i)] for i in idx])
                out = extractor(batch["image"], batch["name"])
                feats = {t: {l: out.maps[t][l] for l in layers} for t in timesteps}
                yield feats, torch.from_numpy(batch["label"]), idx

        return epoch, len(rows)

    (train_b, n), (val_b, _), (test_b, _) = batches("train", True), batches("val", False), batches("test", False)
    return Splits(train_b, val_b, test_b, n)


@dataclasses.dataclass
class FitPlan:
    """A fit resolved before any training: its caches, feature source, device, model and training
    rows, and the digest of everything that decides its numbers."""

    cfg: Config
    caches: dict
    source: str
    device: torch.device
    timesteps: list
    layers: list
    model_config: object
    rows: np.ndarray
    inputs: str


def plan_fit(cfg: Config, device: str | None = None, source: str | None = None, cache_dir: str | None = None) -> FitPlan:
    """Check a fit against its caches (one-line errors) and resolve what it will train on."""
    from ..device import resolve_device

    dev = resolve_device(device or cfg.device)
    if cache_dir:
        cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    caches = open_split_caches(cfg)
    source = fit_source(cfg, caches, source)
    timesteps, layers = feature_selection(cfg, caches["train"])
    shapes = {l: caches["train"].layer_shapes[l] for l in layers}
    config = model_config(cfg, shapes, timesteps)  # refuses bad rescales before the backbone is loaded
    if cfg.limited_label is None:
        rows = partition_rows(cfg, caches["train"])
    else:
        rows = training_rows(caches["train"].sample_names, cfg.limited_label, cfg.seed)
    return FitPlan(cfg, caches, source, dev, timesteps, layers, config, rows,
                   fit_inputs(cfg, caches, source, dev, rows))


def fit_inputs(cfg: Config, caches: dict, source: str, device: torch.device, rows: np.ndarray) -> str:
    """SHA-256 of what decides a fit's numbers: the config's settings (not its paths), the feature
    source, the device type, each split cache's provenance, the training samples' names and the fit's code."""
    names = caches["train"].sample_names
    inputs = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LOCATION_KEYS},
        "source": source, "device": device.type,
        "caches": {split: {"request": c.request, "created": c.attrs.get("created")} for split, c in caches.items()},
        "train_names": hashlib.sha256("\n".join(names[int(i)] for i in rows).encode()).hexdigest(),
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def code_digest() -> str:
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for entry in FIT_CODE:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def fit(cfg: Config, out_dir: str | Path, device: str | None = None, source: str | None = None,
        cache_dir: str | None = None, progress: bool = True, plan: FitPlan | None = None) -> dict:
    """Train and write the outputs; ``source`` (maps, trajectory or live) overrides the config's.
    ``plan`` is this fit's ``plan_fit`` when the caller has made it already."""
    from ..outputs import begin_output, check_replaceable, output_folder, publish_output, remove_partial
    from .resume import STATE_NAME, load_state

    out_dir = output_folder(out_dir)
    check_replaceable(out_dir, FIT_OUTPUTS)
    # Tiny activations turn into subnormal floats in the backward pass, which run tens of times
    # slower on CPUs; flushing them to zero changes nothing measurable and keeps steps steady.
    torch.set_flush_denormal(True)
    plan = plan or plan_fit(cfg, device, source, cache_dir)
    cfg, caches, source, dev, rows = plan.cfg, plan.caches, plan.source, plan.device, plan.rows
    if len(rows) < len(caches["train"]):
        log.info("%s: training on %d of %d images", f"limited_label {cfg.limited_label}" if cfg.limited_label
                 else f"train_partition {cfg.train_partition}", len(rows), len(caches["train"]))
    if source == "trajectory":
        from ..extract.run import check_backbone

        check_backbone(cfg, caches.values())
        splits = trajectory_splits(cfg, caches, plan.timesteps, plan.layers, dev, rows)
    elif source == "live":
        splits = live_splits(cfg, plan.timesteps, plan.layers, dev, caches["train"].plan.shard_size, rows)
    else:
        splits = cached_splits(cfg, caches, plan.timesteps, plan.layers, rows)
    torch.manual_seed(cfg.seed)
    model = FusionModel(plan.model_config).to(dev)
    state = load_state(cfg.resume_from, model, cfg, dev) if cfg.resume_from else None
    # Read before the partial folder is cleared: the state may be that of a fit stopped there.
    partial = begin_output(out_dir, keep=state["path"] if state else None)
    log.info("%s + %s: %d parameters, %d timesteps x %d layers, %s", cfg.fuser, model.config.head,
             sum(p.numel() for p in model.parameters()), len(plan.timesteps), len(plan.layers),
             f"features from {source}")
    try:
        metrics = _train_and_write(cfg, model, splits, caches, partial, dev, source, progress, state, plan.inputs)
    except (Exception, KeyboardInterrupt) as err:
        if (partial / STATE_NAME).is_file():
            log.warning("fit stopped (%s): nothing at %s was changed; the partial output is in %s (resume_from: %s "
                        "continues it)", type(err).__name__, out_dir, partial, partial)
        else:  # stopped before its first epoch ended: nothing worth keeping
            remove_partial(out_dir)
            if not isinstance(err, UserError):  # a user error is reported in its own one line
                log.warning("fit stopped (%s) before its first epoch ended: nothing at %s was changed",
                            type(err).__name__, out_dir)
        raise
    publish_output(partial, out_dir)
    return metrics


def _train_and_write(cfg: Config, model: FusionModel, splits: Splits, caches: dict, out_dir: Path, dev, source: str,
                     progress: bool, state: dict | None, inputs: str) -> dict:
    from ..plots import write_plots

    result = train(cfg, model, splits, out_dir, dev, progress, state)
    extraction = caches["train"].request["extraction"]
    result.metrics.update(fuser=cfg.fuser, dataset=cfg.dataset_name, seed=cfg.seed, source=source,
                          partition=cfg.train_partition, cache_partition=cfg.partition,
                          train_images=splits.train_size, limited_label=cfg.limited_label,
                          timesteps=list(model.config.timesteps), layers=list(model.config.layer_shapes),
                          backbone=caches["train"].request["backbone"]["id"],
                          map_encoding=caches["train"].map_encoding if source == "maps" else None,
                          latent_seed=extraction["seed"], precision=extraction["precision"])
    best = FusionModel.from_pretrained(out_dir / "model", dev)
    aux = aux_summary(cfg, best, splits, dev)
    # LW and MoE summaries run val once more, through the backbone unless from the maps.
    result.metrics["ledger"] = fit_ledger(result, caches, source, len(model.config.timesteps),
                                          live_passes_per_image(cfg), extra_val_passes=int(cfg.fuser != "gw"))
    result.metrics["test_score"] = result.metrics["test"][result.metrics["selection_metric"]]
    result.metrics["inputs_sha256"] = inputs
    write_outputs(out_dir, result, cfg)
    write_plots(out_dir, result, best, aux)
    return result.metrics


def live_passes_per_image(cfg: Config) -> int:
    """UNet passes that give one image the fit's timesteps, as a live fit and the reference run
    them: the inversion stops after the fit's earliest label, whatever the cache holds."""
    from ..backbone.schedule import unet_passes

    return unet_passes(cfg.diffusion_mode, cfg.num_timesteps, cfg.save_timesteps)


def fit_ledger(result, caches: dict, source: str, timesteps: int, per_image: int, extra_val_passes: int = 0) -> dict:
    """UNet and VAE passes this fit ran, and those the reference runs for the same training: it
    recomputes every image's features for every epoch, every validation and the test evaluation,
    ``per_image`` UNet passes each. A fit from the trajectory runs one UNet pass per image and
    timestep and no VAE; from the maps, none. ``extra_val_passes`` are our own passes over val (the
    fusion summary), which only a fit that recomputes its features pays."""
    n = {split: len(cache) for split, cache in caches.items()}
    evaluations = sum(1 for row in result.history if any(k.startswith("val_") for k in row))
    # Training batches, every validation, and the best model's final val and test evaluations.
    reference = result.metrics["train_images_seen"] + (evaluations + 1) * n["val"] + n["test"]
    ran = reference + extra_val_passes * n["val"] if source != "maps" else 0
    return {"epochs": result.metrics["epochs_run"], "val_evaluations": evaluations, "images_through_backbone": ran,
            "unet_passes": ran * (per_image if source == "live" else timesteps),
            "vae_passes": ran if source == "live" else 0,
            "reference_unet_passes": reference * per_image, "reference_vae_passes": reference,
            "unet_passes_per_image": per_image}


# What run.json records of the config at its top level, for tables of runs (the whole config is there too).
RUN_SETTINGS = ("lr", "op_weight_decay", "batch_size", "early_stopping_patience", "max_train_epochs",
                "warmup_epochs", "min_lr", "eval_every_n_steps", "projection_dim")
# The record's numbers that metrics.json holds; everything else of it is run.json's.
METRIC_KEYS = ("test_score", "best_step", "epochs_run", "train_seconds", "parameters", "train_images_seen",
               "data_wait_seconds")


def split_record(record: dict, cfg: Config) -> tuple[dict, dict]:
    """(metrics, run) of a fit's record: metrics.json takes numbers only, so that ``dvc metrics show``
    stays a table; run.json takes what the run was, and the per-class lists and confusion matrices."""
    def numbers(split: dict) -> dict:
        return {k: v for k, v in split.items() if _is_number(v)}

    ledger = record["ledger"]
    metrics = {"val": numbers(record["val"]), "test": numbers(record["test"]),
               **{k: record[k] for k in METRIC_KEYS},
               "unet_passes": ledger["unet_passes"], "reference_unet_passes": ledger["reference_unet_passes"]}
    per_class = {split: {k: v for k, v in record[split].items() if not _is_number(v)} for split in ("val", "test")}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "config_file"}
    run = {k: v for k, v in record.items() if k not in METRIC_KEYS and k not in ("val", "test")}
    run.update({k: getattr(cfg, k) for k in RUN_SETTINGS}, config_file=cfg.config_file, per_class=per_class,
               config=config)
    return metrics, run


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_outputs(out_dir: Path, result, cfg: Config) -> None:
    metrics, run = split_record(result.metrics, cfg)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    base = ["step", "epoch", "lr", "train_loss"]
    fields = base + sorted({k for row in result.history for k in row} - set(base))
    with open(out_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result.history)


def aux_summary(cfg: Config, model: FusionModel, splits: Splits, device) -> dict:
    """What the fuser learned: GW weights, LW mean gates (over the validation split) as a
    (timestep, layer) table, or MoE expert usage per scale."""
    from .loop import to_device

    fuser = model.fuser
    T, layers = len(fuser.timesteps), fuser.layers
    if model.config.fuser == "gw":
        return {"weights": torch.softmax(fuser.mixing_weights.detach(), 0).view(T, len(layers)).cpu().numpy()}
    output_shape = cfg.output_shape
    total, n = None, 0
    model.eval()
    with torch.no_grad():
        for feats, labels, _ in splits.val(0):
            _, aux = model(to_device(feats, device), output_shape)
            if model.config.fuser == "lw":
                part = torch.cat([g.mean(dim=(2, 3)).sum(0).view(T, -1) for g in aux["gates"]], dim=1)
            else:
                part = aux["expert_usage"].view(len(fuser.scales), T, -1).mean(1) * len(labels)
            total = part if total is None else total + part
            n += len(labels)
    key = "weights" if model.config.fuser == "lw" else "expert_usage"
    return {key: (total / n).cpu().numpy()}


def evaluate_saved(cfg: Config, model_dir: str | Path, split: str = "test", cache_dir: str | None = None,
                   device: str | None = None) -> dict:
    """Metrics of a saved model on one split's cache (the features it was trained on)."""
    from ..device import resolve_device

    dev = resolve_device(device or cfg.device)
    model = FusionModel.from_pretrained(model_dir, dev)
    head = "upernet" if cfg.task == "segmentation" else "linear"
    differ = [f"{key}: model {have!r}, config {want!r}" for key, have, want in
              (("num_classes", model.config.num_classes, cfg.num_classes), ("head", model.config.head, head))
              if have != want]
    if differ:
        raise UserError(f"{model_dir} was not trained for {cfg.config_file} ({'; '.join(differ)}); evaluate it with the "
                        "config it was trained with")
    if cache_dir:
        cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    cache = open_cache(cfg.cache_path(split), expect=expected_request(cfg, split))
    check_encoding(cfg, cache)
    batches = CacheBatches(cache, cfg.val_batch_size, model.config.timesteps, list(model.config.layer_shapes))
    return evaluate(model, batches.epoch(0), cfg.task, cfg.num_classes, cfg.ignore_index, cfg.output_shape, dev)
