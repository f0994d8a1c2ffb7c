"""A trained model is a fuser plus a head; saved as ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .fusion.fusers import build_fuser
from .heads.heads import LinearHead, UPerNetHead

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing; a saved model holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        model = cls(ModelConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=str(device)))
        return model.to(device)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
