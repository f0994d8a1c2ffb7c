"""The resumable training state of a fit, and ``resume_from``.

At the end of every epoch a fit writes ``training_state.pt`` beside its best model: the model's
weights and buffers, the optimizer's state, the epochs done, the step, the best validation value
and its step, the patience counter, the images seen, the history rows, the time spent, the
random number generator's state, and the best model's weights when they are not the current
ones. The batch order needs nothing more: it is a function of (seed, epoch), and the learning
rate one of the epoch. ``resume_from`` (a fit's output folder or the file itself) loads it, and
training goes on with the next epoch as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import default_value
from ..errors import UserError, first_line
from ..model import MOE_STEPS, WEIGHTS_NAME, FusionModel
from ..outputs import partial_path

log = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
FORMAT = "satdifuser-training-state/1"
# What must equal for a state to continue this experiment (the model's architecture is checked too):
# the training images among them, since epochs on other images would not continue the same fit.
IDENTITY = ("task", "dataset_name", "partition", "train_partition", "limited_label")
# Settings that may change on resume (to train for more epochs, say); a change is logged.
SETTINGS = ("lr", "op_weight_decay", "warmup_epochs", "min_lr", "batch_size", "max_train_epochs",
            "early_stopping_patience", "eval_every_n_steps", "seed", "shuffle_buffer_shards", "moe_balance_weight")
COUNTERS = ("epoch", "step", "best", "best_step", "stale", "seen", "history", "seconds", "data_wait")
ENTRIES = ("format", "model_config", "experiment", "settings", "model", "buffers", "best_model", "optimizer", "rng", *COUNTERS)


class ResumeError(UserError):
    """A ``resume_from`` that cannot continue this fit."""


def _plain(value):
    """JSON's view of a value (tuples as lists), so a saved config compares equal to a fresh one."""
    return json.loads(json.dumps(value))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_state(folder: Path, model: FusionModel, optimizer: torch.optim.Optimizer, cfg, device: torch.device,
               counters: dict) -> None:
    """Write the state after an epoch; written aside and renamed, so a kill leaves the previous one."""
    persistent = model.state_dict()
    best = None
    if counters["best_step"] != counters["step"]:  # the weights moved on since the best validation
        from safetensors.torch import load_file

        best = load_file(str(folder / "model" / WEIGHTS_NAME))
    state = {
        "format": FORMAT, "model_config": _plain(asdict(model.config)),
        "experiment": {k: getattr(cfg, k) for k in IDENTITY}, "settings": {k: getattr(cfg, k) for k in SETTINGS},
        "model": persistent, "buffers": {n: b for n, b in model.named_buffers() if n not in persistent},
        "best_model": best, "optimizer": optimizer.state_dict(), "rng": _rng_state(device), **counters,
    }
    path = folder / STATE_NAME
    tmp = path.with_name(f".{STATE_NAME}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _locate(given: str) -> Path:
    path = Path(given)
    if path.is_dir():
        path = path / STATE_NAME
    if path.is_file():
        return path
    hint = ""
    stopped = partial_path(Path(os.path.abspath(given))) / STATE_NAME
    if stopped.is_file():
        hint = f"; the state of a fit into it that did not finish is {stopped}"
    raise ResumeError(f"resume_from {given}: no training state there (expected the output folder of a fit, "
                      f"holding {STATE_NAME}, or that file){hint}")


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "layer_shapes" and isinstance(a, dict) and isinstance(b, dict):
            only_saved, only_here = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            if only_saved or only_here:
                out.append(f"layers: only the state has {only_saved}, only this config has {only_here}")
            else:
                out += [f"shape of {l}: state {a[l]}, this config {b[l]}" for l in a if a[l] != b[l]]
        else:
            out.append(f"{key}: state {a!r}, this config {b!r}")
    return out


def load_state(given: str, model: FusionModel, cfg, device: torch.device) -> dict:
    """The state at ``given``, checked against the experiment; one line if it cannot continue it."""
    path = _locate(given)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch reports truncation and garbage with many exception types
        raise ResumeError(f"resume_from {path}: not a readable training state ({first_line(err)}); resume from an intact "
                          "copy or remove resume_from to train from the start") from None
    missing = [k for k in ENTRIES if k not in state] if isinstance(state, dict) else list(ENTRIES)
    if missing or state["format"] != FORMAT:
        raise ResumeError(f"resume_from {path}: not a training state of `satdifuser fit` (format "
                          f"{state.get('format') if isinstance(state, dict) else None!r}, lacking {missing}); "
                          "give the output folder of a fit or its " + STATE_NAME)
    here = {"experiment": {k: getattr(cfg, k) for k in IDENTITY}, "model": _plain(asdict(model.config))}
    # A state saved before a key joined IDENTITY was trained with that key's default.
    saved = {k: state["experiment"].get(k, default_value(k)) for k in IDENTITY}
    differ = (_differences(saved, here["experiment"])
              + _differences(state["model_config"], here["model"]))
    if differ:
        raise ResumeError(f"resume_from {path}: the state belongs to another experiment ({'; '.join(differ)}); "
                          "resume with the config it was trained with, or remove resume_from")
    changed = _differences(state["settings"], {k: getattr(cfg, k) for k in SETTINGS})
    if changed:
        log.warning("resuming with changed settings: %s", "; ".join(changed))
    log.info("resuming %s after epoch %d (step %d)", path, state["epoch"], state["step"])
    state["path"] = path
    return state


def _with_moe_steps(weights: dict, model: FusionModel, steps: int) -> dict:
    """States saved before the MoE's step count was a weight: one training forward per step."""
    if MOE_STEPS in model.state_dict() and MOE_STEPS not in weights:
        return {**weights, MOE_STEPS: torch.tensor(steps, dtype=torch.long)}
    return weights


def restore(state: dict, model: FusionModel, optimizer: torch.optim.Optimizer, best_dir: Path,
            device: torch.device) -> None:
    """Put the saved weights, buffers, optimizer and RNG state back, and the best model in ``best_dir``."""
    try:
        model.load_state_dict(_with_moe_steps(state["model"], model, state["step"]))
        for name, value in state["buffers"].items():
            model.get_buffer(name).copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        best = FusionModel(model.config)
        best_weights = state["best_model"] if state["best_model"] is not None else state["model"]
        best.load_state_dict(_with_moe_steps(best_weights, best, state["best_step"]))
    except (RuntimeError, ValueError, KeyError, AttributeError) as err:
        raise ResumeError(f"resume_from {state['path']}: its weights do not fit the model ({first_line(err)}); "
                          "resume from an intact state or remove resume_from") from None
    best.save_pretrained(best_dir)
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
