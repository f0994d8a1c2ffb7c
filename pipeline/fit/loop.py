"""Fit a fuser and head from cached features, as the reference trains them.

Adam with the config's lr and weight decay; the learning rate starts at 2e-5, rises linearly to
``lr`` over ``warmup_epochs`` and follows a cosine to ``min_lr`` at ``max_train_epochs``, stepped
once per epoch. Validation every ``eval_every_n_steps`` (at most one epoch); early stopping after
``early_stopping_patience`` validations without improvement; the best model is kept and evaluated
on test once at the end. Unlike the reference, the model returns to train mode after a mid-epoch
validation, and no evaluation runs before training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbone.layer_spec import resolve_in_cache
from ..cache.reader import FeatureCache
from ..cache.store import CacheError
from ..config import Config, ConfigError
from ..fusion.fusers import group_by_scale
from ..metrics import SELECTION, Accumulator
from ..model import FusionModel, ModelConfig, parameter_count

log = logging.getLogger(__name__)

INIT_LR = 2e-5  # the reference's warm-up starting point


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """The reference's per-epoch schedule (epoch 0 runs at 2e-5)."""

    def __init__(self, optimizer, warmup_epochs: int, max_lr: float, min_lr: float, total_epochs: int,
                 last_epoch: int = -1):
        self.warmup_epochs, self.max_lr, self.min_lr, self.total_epochs = warmup_epochs, max_lr, min_lr, total_epochs
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        epoch = min(self.last_epoch, self.total_epochs)
        if epoch < self.warmup_epochs:
            lr = INIT_LR + (self.max_lr - INIT_LR) * epoch / self.warmup_epochs
        else:
            span = max(self.total_epochs - self.warmup_epochs, 1)
            lr = self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
        return [lr for _ in self.optimizer.param_groups]


def criterion(task: str, ignore_index: int) -> nn.Module:
    if task == "multi_label_classification":
        return nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss(ignore_index=ignore_index)


def prepare_labels(task: str, labels: torch.Tensor, device) -> torch.Tensor:
    labels = labels.to(device)
    return labels.float() if task == "multi_label_classification" else labels.long()


# ---- selecting what the experiment asks for from what the cache holds --------------------------


def feature_selection(cfg: Config, cache: FeatureCache) -> tuple[list[str], list[str]]:
    """The timesteps and layers the experiment asks for, exactly: each must be in the cache, and
    ``layer_idxs`` selects what it would select on the UNet, never what the cache happens to hold."""
    timesteps = [f"t{s}" for s in cfg.save_timesteps]
    lacking = [t for t in timesteps if t not in cache.timesteps]
    if lacking:
        raise CacheError(f"cache {cache.path} has no timesteps {lacking}; it holds {cache.timesteps}")
    layers = resolve_in_cache(cfg.layer_idxs, cache.layers, cache.layer_catalog,
                              cache.request["extraction"]["layer_idxs"], cache.path)
    return timesteps, layers


def model_config(cfg: Config, layer_shapes: dict, timesteps: list[str]) -> ModelConfig:
    seg = cfg.task == "segmentation"
    return ModelConfig(
        fuser=cfg.fuser, head="upernet" if seg else "linear", layer_shapes=layer_shapes, timesteps=timesteps,
        num_classes=cfg.num_classes, projection_dim=cfg.projection_dim, num_experts=cfg.num_experts,
        top_k=cfg.top_k, moe_warmup_steps=cfg.moe_warmup_steps or (500 if seg else 300),
        channels=cfg.channels, pool_scales=list(cfg.pool_scales),
        rescales=scale_factors(cfg, layer_shapes), lw_input=cfg.lw_input,
    )


def scale_factors(cfg: Config, layer_shapes: dict) -> list:
    """``rescales``, one factor per scale of the selected layers. Factors of 1 only (the default,
    four of them) fit any number of scales; other factors must name each scale."""
    widths = list(group_by_scale(layer_shapes))
    if all(f == 1 for f in cfg.rescales):
        return [1] * len(widths)
    if len(cfg.rescales) != len(widths):
        raise ConfigError(f"{cfg.config_file}: rescales {cfg.rescales} has {len(cfg.rescales)} factors but the selected "
                          f"layers make {len(widths)} scales (widths {widths}); give one factor per scale, widest first")
    return list(cfg.rescales)


# ---- training ----------------------------------------------------------------------------------


@dataclass
class FitResult:
    out_dir: Path
    metrics: dict
    history: list = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    class_names: tuple | None = None  # for the plots; None: classes shown by index


Batches = Callable[[int], Iterator[tuple[dict, torch.Tensor, np.ndarray]]]


def evaluate(model: FusionModel, batches: Iterator, task: str, num_classes: int, ignore_index: int,
             output_shape, device) -> dict:
    was_training = model.training
    model.eval()
    acc = Accumulator(task, num_classes, None if ignore_index < 0 else ignore_index)
    with torch.no_grad():
        for feats, labels, _ in batches:
            logits, _ = model(to_device(feats, device), output_shape)
            acc.update(logits, labels)
    model.train(was_training)
    return acc.compute()


def to_device(feats: dict, device) -> dict:
    return {t: {l: x.to(device, non_blocking=True) for l, x in by_layer.items()} for t, by_layer in feats.items()}


@dataclass
class Splits:
    train: Batches
    val: Batches
    test: Batches
    train_size: int


def train(cfg: Config, model: FusionModel, splits: Splits, out_dir: Path, device, progress: bool = True,
          resume: dict | None = None) -> FitResult:
    """The reference's loop over ``splits``; writes the best model and, after every epoch, the
    training state (``pipeline.fit.resume``), and returns val/test metrics. ``resume`` is a loaded
    state to continue from."""
    from tqdm.auto import tqdm

    from ..fusion.fusers import checkpoint_projections
    from .resume import restore, save_state

    checkpoint_projections(model, cfg.checkpoint_projections)
    task = cfg.task
    select = SELECTION[task]
    output_shape = cfg.output_shape
    loss_fn = criterion(task, cfg.ignore_index)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.op_weight_decay)
    best_dir = out_dir / "model"
    done = resume or {}
    if resume:
        restore(resume, model, opt, best_dir, device)
    # Resumed, the schedule is this config's at the epochs done (the same as before unless it changed).
    sched = WarmupCosine(opt, cfg.warmup_epochs, cfg.lr, cfg.min_lr, cfg.max_train_epochs, done.get("epoch", 0) - 1)
    steps_per_epoch = -(-splits.train_size // cfg.batch_size)
    eval_every = min(cfg.eval_every_n_steps or steps_per_epoch, steps_per_epoch)

    def run_eval(batches):
        return evaluate(model, batches, task, cfg.num_classes, cfg.ignore_index, output_shape, device)

    best, best_step = done.get("best", -math.inf), done.get("best_step", 0)
    stale, step = done.get("stale", 0), done.get("step", 0)
    history = list(done.get("history", []))
    seen = done.get("seen", 0)  # training images through the model, for the cost ledger
    data_wait, spent = done.get("data_wait", 0.0), done.get("seconds", 0.0)
    started = time.perf_counter()
    epochs_done = done.get("epoch", 0)
    # A state saved when early stopping struck trains no further.
    last = cfg.max_train_epochs if stale < cfg.early_stopping_patience else epochs_done
    model.train()
    for epoch in range(epochs_done, last):
        bar = tqdm(splits.train(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
        batches = iter(bar)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)  # the time spent here is time the model waited for data
            data_wait += time.perf_counter() - waited
            if batch is None:
                break
            feats, labels, _ = batch
            step += 1
            seen += len(labels)
            opt.zero_grad()
            logits, aux = model(to_device(feats, device), output_shape)
            loss = loss_fn(logits, prepare_labels(task, labels, device))
            if "balance_loss" in aux and cfg.moe_balance_weight:
                # The reference's term is -KL(usage || uniform): subtract it, so that a positive
                # weight pulls usage towards uniform (adding it would reward imbalance).
                loss = loss - cfg.moe_balance_weight * aux["balance_loss"]
            loss.backward()
            opt.step()
            row = {"step": step, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss.item()}
            bar.set_postfix(loss=f"{row['train_loss']:.4f}")
            if step % eval_every == 0:
                val = run_eval(splits.val(0))
                row[f"val_{select}"] = val[select]
                if val[select] > best:
                    best, best_step, stale = val[select], step, 0
                    model.save_pretrained(best_dir)
                else:
                    stale += 1
                log.info("step %d: val %s %.4f (best %.4f at step %d)", step, select, val[select], best, best_step)
            history.append(row)
            if stale >= cfg.early_stopping_patience:
                break
        sched.step()
        epochs_done = epoch + 1
        save_state(out_dir, model, opt, cfg, torch.device(device), {
            "epoch": epochs_done, "step": step, "best": best, "best_step": best_step, "stale": stale, "seen": seen,
            "history": history, "seconds": spent + time.perf_counter() - started, "data_wait": data_wait})
        if stale >= cfg.early_stopping_patience:
            log.info("early stopping after %d validations without improvement", stale)
            break
    seconds = spent + time.perf_counter() - started
    if not best_dir.exists():
        raise RuntimeError("no validation ran; check eval_every_n_steps and the training split")
    best_model = FusionModel.from_pretrained(best_dir, device)
    val = evaluate(best_model, splits.val(0), task, cfg.num_classes, cfg.ignore_index, output_shape, device)
    test = evaluate(best_model, splits.test(0), task, cfg.num_classes, cfg.ignore_index, output_shape, device)
    metrics = {"selection_metric": select, "best_step": best_step, "epochs_run": epochs_done, "val": val, "test": test,
               "train_seconds": round(seconds, 2), "parameters": parameter_count(model), "train_images_seen": seen,
               "data_wait_seconds": round(data_wait, 3)}
    from ..data.geobench_task import class_names

    return FitResult(out_dir, metrics, history, epochs_done, seconds, class_names(cfg))
