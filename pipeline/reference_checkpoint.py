"""Heads trained by the reference code, turned into saved models of ours (``satdifuser import-reference``).

The reference saves ``torch.save({"epoch", "global_step", "config", "decoder_net",
"optimizer_state_dict", "lr_scheduler"})``. Its decoder is one module that inherits both the fuser
and the head, so its weight names carry no ``fuser.`` / ``head.`` prefix, and LW's per-scale gate
is a ``gate_conv`` inside a module of its own; every other name is ours. Its ``config`` is an
OmegaConf object: it is read here without OmegaConf (its values only, through torch's weights-only
loader with stand-ins for OmegaConf's classes) and checked against the config the head is imported
for, so that a head is never loaded onto layers, timesteps or classes it was not trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import typing
from pathlib import Path

import torch

from .config import Config
from .errors import UserError, first_line
from .model import MOE_STEPS, FusionModel

log = logging.getLogger(__name__)

FUSER_KEYS = ("bottleneck_layers.", "mixing_weights", "gate_modules.", "scale_moes.")
HEAD_KEYS = ("decoder_head.", "neck.", "psp_modules.", "bottleneck.", "lateral_convs.", "fpn_convs.",
             "fpn_bottleneck.", "conv_seg.")
LW_GATE = re.compile(r"^gate_modules\.(\d+)\.gate_conv\.")
# The reference's config keys that decide the model's shape (our config names them the same).
CHECKED = ("task", "fuser", "num_classes", "projection_dim", "save_timesteps")
CHECKED_MOE = ("num_experts", "top_k")
CHECKED_SEG = ("channels", "pool_scales")


class ReferenceCheckpointError(UserError):
    """A file that is not a decoder checkpoint of the reference, or one that does not fit the config."""


class _OmegaConfStandIn:
    """Takes the pickled state of one of OmegaConf's classes; ``plain`` reads the values out."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})


def _stand_ins() -> list:
    names = ["dictconfig.DictConfig", "listconfig.ListConfig", "base.Metadata", "base.ContainerMetadata",
             "nodes.AnyNode", "nodes.StringNode", "nodes.IntegerNode", "nodes.FloatNode", "nodes.BooleanNode",
             "nodes.BytesNode", "nodes.PathNode", "nodes.EnumNode", "nodes.ValueNode"]
    found = []
    for name in names:
        module, cls = name.rsplit(".", 1)
        found.append((type(cls, (_OmegaConfStandIn,), {}), f"omegaconf.{module}.{cls}"))
    # Types OmegaConf's metadata names (key and element types), as values, never called.
    types = [(t, f"builtins.{t.__name__}") for t in (dict, list, tuple, int, float, str, bool, bytes, object)]
    return found + types + [(typing.Any, "typing.Any"), (collections.defaultdict, "collections.defaultdict")]


def plain(value):
    """OmegaConf stand-ins as plain dicts, lists and values."""
    if isinstance(value, _OmegaConfStandIn):
        if "_content" in value.__dict__:
            return plain(value._content)
        return plain(value.__dict__.get("_val"))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(weights, the reference's settings or {}) of a reference checkpoint, or of a bare state dict
    of its decoder."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceCheckpointError(f"{path}: no such file (expected a .pth checkpoint saved by the reference's run.py)")
    try:
        with torch.serialization.safe_globals(_stand_ins()):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise ReferenceCheckpointError(f"{path}: not a readable checkpoint ({_reason(err)}); give the "
                                       "best_ckpt_step_*.pth file the reference's run.py saved") from None
    if isinstance(saved, dict) and "decoder_net" in saved:
        settings = plain(saved.get("config")) or {}
        return dict(saved["decoder_net"]), settings if isinstance(settings, dict) else {}
    if isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return dict(saved), {}
    keys = sorted(saved)[:6] if isinstance(saved, dict) else type(saved).__name__
    raise ReferenceCheckpointError(f"{path}: holds no 'decoder_net' (keys {keys}); "
                                   "give the checkpoint the reference's run.py saved, or its decoder's state dict")


def _reason(err: Exception) -> str:
    """The line of torch's weights-only message that names what stopped it."""
    lines = [line.strip() for line in str(err).splitlines()]
    named = [line for line in lines if "Unpickler error:" in line or "Unsupported global" in line]
    return (named[0].split("error:", 1)[-1].strip() if named else first_line(err))[:200]


def our_names(weights: dict) -> dict:
    """The reference decoder's weight names in our model's: ``fuser.``/``head.`` prefixes, LW's gate."""
    renamed, unknown = {}, []
    for key, value in weights.items():
        if key.startswith(FUSER_KEYS):
            renamed["fuser." + LW_GATE.sub(r"gate_modules.\1.", key)] = value
        elif key.startswith(HEAD_KEYS):
            renamed["head." + key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ReferenceCheckpointError(f"weights {unknown[:4]} belong to no fuser or head of the reference; "
                                       "give a checkpoint of its GW, LW or MoE decoder")
    return renamed


def _differences(settings: dict, cfg: Config) -> list[str]:
    checked = CHECKED + (CHECKED_MOE if cfg.fuser == "moe" else ()) + (CHECKED_SEG if cfg.task == "segmentation" else ())
    differ = []
    for key in checked:
        if settings.get(key) is None:
            continue
        have, want = settings[key], getattr(cfg, key)
        if isinstance(want, (list, tuple)):
            have, want = list(have), list(want)
        if have != want:
            differ.append(f"{key}: checkpoint {have!r}, config {want!r}")
    return differ


def import_reference(checkpoint: str | Path, cfg: Config, out: str | Path, cache_dir: str | None = None) -> Path:
    """Save the reference's decoder in ``checkpoint`` as a model folder ``out`` for ``cfg``'s caches."""
    from .cache.reader import open_cache
    from .fit.loop import feature_selection, model_config
    from .fit.run import expected_request

    weights, settings = read_checkpoint(checkpoint)
    if not settings:
        log.warning("%s holds no readable config: its task, fuser, classes and timesteps are not checked against "
                    "%s; only the weights' shapes are", checkpoint, cfg.config_file)
    differ = _differences(settings, cfg)
    if differ:
        raise ReferenceCheckpointError(f"{checkpoint} was not trained with {cfg.config_file} ({'; '.join(differ)}); "
                                       "import it with the experiment config it was trained with")
    if cache_dir:
        cfg = dataclasses.replace(cfg, cache_dir=cache_dir)
    cache = open_cache(cfg.cache_path("train"), expect=expected_request(cfg, "train"))
    timesteps, layers = feature_selection(cfg, cache)
    shapes = {layer: tuple(cache.layer_shapes[layer]) for layer in layers}
    # The reference feeds LW's projections its own channel slices (see LocalWeightedFuser): its heads
    # were trained on those inputs.
    config = model_config(dataclasses.replace(cfg, lw_input="reference"), shapes, timesteps)
    model = FusionModel(config)
    renamed = our_names(weights)
    if MOE_STEPS in model.state_dict():
        # The reference tests its best MoE with the step counter where training ended, which counts
        # every timestep of every training and evaluation forward: past its warm-up in any run of
        # more than warm-up / timesteps steps, so it routes top-k. The head is imported routing so.
        renamed[MOE_STEPS] = torch.tensor(config.moe_warmup_steps)
    try:
        model.load_state_dict(renamed)
    except RuntimeError as err:
        raise ReferenceCheckpointError(f"{checkpoint}: its weights do not fit the model {cfg.config_file} and the "
                                       f"cache describe ({first_line(err.args[0].split(':', 1)[-1])}); import it "
                                       "with the config and layers it was trained on") from None
    out = Path(out)
    model.save_pretrained(out)
    log.info("%s: %s + %s head with %d timesteps x %d layers, from %s", out, config.fuser, config.head,
             len(timesteps), len(layers), checkpoint)
    return out

