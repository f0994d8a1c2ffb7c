"""A trained model is a fuser plus a head; saved as ``config.json`` + ``model.safetensors``.

The model is a ``huggingface_hub`` model: ``push_to_hub`` publishes a saved folder (with a model
card) and ``from_pretrained`` takes a folder or a Hub repo id. Loading is strict: every weight the
config describes must be in the file, none more.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .errors import UserError, first_line
from .fusion.fusers import build_fuser
from .heads.heads import LinearHead, UPerNetHead

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
REFIT = "re-run `satdifuser fit` or restore the folder from a copy"
MOE_STEPS = "fuser.train_steps"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

log = logging.getLogger(__name__)


class ModelError(UserError):
    """A saved model folder that cannot be loaded."""


@dataclass(frozen=True)
class ModelConfig:
    fuser: str
    head: str  # "linear" or "upernet"
    layer_shapes: dict  # layer -> (C, H, W), in the cache's order
    timesteps: list  # label keys, e.g. ["t47", "t45", "t40"]
    num_classes: int
    projection_dim: int = 384
    num_experts: int = 8
    top_k: int = 2
    moe_warmup_steps: int = 300
    channels: int = 512
    pool_scales: list = field(default_factory=lambda: [1, 2, 3, 6])
    rescales: list = field(default_factory=lambda: [1, 1, 1, 1])
    lw_input: str = "paper"  # models saved before the option existed are "paper"

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["layer_shapes"] = {k: tuple(v) for k, v in d["layer_shapes"].items()}
        return cls(**d)


class FusionModel(nn.Module, PyTorchModelHubMixin, library_name="satdifuser-cache",
                  tags=["satdifuser", "remote-sensing", "diffusion-features"]):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.fuser = build_fuser(
            config.fuser, config.layer_shapes, config.timesteps, config.projection_dim,
            config.num_experts, config.top_k, config.moe_warmup_steps, config.lw_input,
        )
        if config.head == "linear":
            self.head = LinearHead(config.projection_dim, config.num_classes)
        elif config.head == "upernet":
            self.head = UPerNetHead(config.projection_dim, len(self.fuser.scales), config.num_classes,
                                    config.channels, config.pool_scales, config.rescales)
        else:
            raise ValueError(f"head {config.head!r} is not 'linear' or 'upernet'")

    def forward(self, feats: dict, output_shape=None) -> tuple[torch.Tensor, dict]:
        scales, aux = self.fuser(feats)
        return self.head(scales, output_shape), aux

    def _save_pretrained(self, folder: Path) -> None:
        """Called by the mixin's ``save_pretrained``, which then adds a model card (README.md)."""
        from safetensors.torch import save_file

        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu", *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None) -> FusionModel:
        """A model from a saved folder, or from a Hub repo id (``user/name``) when no such folder exists."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = _model_folder(name_or_path, revision, cache_dir, token)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing; a saved model holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = _read_config(folder / CONFIG_NAME)
        try:
            model = cls(config)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:  # a value no model has
            raise ModelError(f"{folder / CONFIG_NAME} does not describe a model that can be built "
                             f"({first_line(err)}); {REFIT}") from None
        try:
            weights = load_file(str(folder / WEIGHTS_NAME), device=str(device))
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file ({first_line(err)}); "
                             f"it is truncated or damaged: {REFIT}") from None
        if config.fuser == "moe" and MOE_STEPS not in weights:
            # Saved before the MoE's step count was kept with its weights: as it was then, it mixes
            # the experts densely until the warm-up's number of training steps, i.e. always here.
            log.warning("%s holds no MoE step count (saved by an older version): it routes as in its warm-up "
                        "(dense mixing); refit it to evaluate with top-k routing", folder / WEIGHTS_NAME)
            weights[MOE_STEPS] = model.get_buffer(MOE_STEPS).to(device)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ModelError(f"{folder / WEIGHTS_NAME} does not hold the weights {CONFIG_NAME} describes "
                             f"({first_line(err.args[0].split(':', 1)[-1])}); {REFIT}") from None
        return model.to(device)


def _model_folder(name_or_path: str | Path, revision, cache_dir, token) -> Path:
    """The local folder of a model: the path itself, or the Hub snapshot holding its two files."""
    path = Path(name_or_path)
    if path.exists() or not REPO_ID.match(str(name_or_path)):
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        files = [hf_hub_download(str(name_or_path), name, revision=revision, cache_dir=cache_dir, token=token)
                 for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as err:
        raise ModelError(f"{name_or_path}: no such model folder, and not a Hub model this machine can fetch "
                         f"({first_line(err)}); give a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a repo id "
                         "with network access (or already in the Hugging Face cache)") from None
    return Path(files[0]).parent


def _read_config(path: Path) -> ModelConfig:
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({first_line(err)}); {REFIT}") from None
    keys = {f.name for f in fields(ModelConfig)}
    required = {f.name for f in fields(ModelConfig) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(values, dict):
        raise ModelError(f"{path} must hold a JSON object with the keys {sorted(keys)}; {REFIT}")
    missing, unknown = sorted(required - set(values)), sorted(set(values) - keys)
    if missing or unknown:
        raise ModelError(f"{path} is not a saved model's config (missing keys {missing}, unknown keys {unknown}); {REFIT}")
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError, AttributeError) as err:
        raise ModelError(f"{path} does not describe a model that can be built ({first_line(err)}); {REFIT}") from None


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
