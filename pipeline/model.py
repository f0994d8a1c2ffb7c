"""A trained model is a fuser plus a head; saved as ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, first_line
from .fusion.fusers import build_fuser
from .heads.heads import LinearHead, UPerNetHead

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
REFIT = "re-run `satdifuser fit` or restore the folder from a copy"


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
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["layer_shapes"] = {k: tuple(v) for k, v in d["layer_shapes"].items()}
        return cls(**d)


class FusionModel(nn.Module):
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

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "FusionModel":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
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
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ModelError(f"{folder / WEIGHTS_NAME} does not hold the weights {CONFIG_NAME} describes "
                             f"({first_line(err.args[0].split(':', 1)[-1])}); {REFIT}") from None
        return model.to(device)


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
