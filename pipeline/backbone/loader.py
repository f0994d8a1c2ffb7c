"""Load a DiffusionSat checkpoint from the published folder layout.

The released checkpoints (Zenodo records 13756199 at 256 px, 13751498 at 512 px) unpack to::

    <root>/resolution256/
        model_index.json
        scheduler/scheduler_config.json
        text_encoder/{config.json, model.safetensors | pytorch_model.bin}
        tokenizer/{vocab.json, merges.txt, ...}
        vae/{config.json, diffusion_pytorch_model.(safetensors|bin)}
        checkpoint-150000/unet/{config.json, diffusion_pytorch_model.(safetensors|bin)}

Everything is read with ``local_files_only``: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class BackboneError(UserError):
    """A checkpoint folder that does not hold what the loader needs."""


@dataclass(frozen=True)
class BackboneSpec:
    """Where a DiffusionSat checkpoint lies and how to build its UNet."""

    root: Path
    img_size: int = 256
    resolution_subfolder: str | None = None  # default: resolution{img_size}, as the reference
    unet_subfolder: str = "checkpoint-150000/unet"
    use_metadata: bool = False
    num_metadata: int = 7

    @property
    def path(self) -> Path:
        sub = self.resolution_subfolder or f"resolution{self.img_size}"
        return Path(self.root) / sub if sub != "." else Path(self.root)


@dataclass
class DiffusionSat:
    """The parts of a DiffusionSat checkpoint that feature extraction uses."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    spec: BackboneSpec

    def to(self, device: torch.device | str) -> "DiffusionSat":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def _layout_text(spec: BackboneSpec) -> str:
    return (
        f"expected {spec.path}/ holding model_index.json, scheduler/, text_encoder/, tokenizer/, "
        f"vae/ and {spec.unet_subfolder}/{{config.json, {UNET_WEIGHTS[0]} or {UNET_WEIGHTS[1]}}}"
    )


def _required(spec: BackboneSpec) -> list[tuple[str, ...]]:
    """Files the loader reads, each as alternatives (any one will do)."""
    unet = spec.unet_subfolder
    return [
        ("model_index.json",),
        ("scheduler/scheduler_config.json",),
        ("text_encoder/config.json",),
        ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
        ("tokenizer/vocab.json", "tokenizer/tokenizer.json"),
        ("vae/config.json",),
        ("vae/" + UNET_WEIGHTS[0], "vae/" + UNET_WEIGHTS[1]),
        (f"{unet}/config.json",),
        (f"{unet}/{UNET_WEIGHTS[0]}", f"{unet}/{UNET_WEIGHTS[1]}"),
    ]


def check_layout(spec: BackboneSpec) -> Path:
    """Return the UNet weight file, or raise a BackboneError naming the first missing path."""
    path = spec.path
    hint = (
        "; download DiffusionSat (Zenodo 13756199 for 256 px, 13751498 for 512 px) or set "
        "pretrained_model_name_or_path / resolution_subfolder / unet_subfolder"
    )
    if not path.is_dir():
        raise BackboneError(f"DiffusionSat checkpoint folder {path} does not exist: {_layout_text(spec)}{hint}")
    for alternatives in _required(spec):
        if not any((path / name).is_file() for name in alternatives):
            missing = " or ".join(str(path / name) for name in alternatives)
            raise BackboneError(f"{missing} is missing: {_layout_text(spec)}{hint}")
    unet_dir = path / spec.unet_subfolder
    return next(unet_dir / name for name in UNET_WEIGHTS if (unet_dir / name).is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(spec: BackboneSpec) -> dict:
    """Hashes of every file the backbone is built from, plus the UNet options.

    Two caches built from the same files and options carry the same ``id``, wherever the
    checkpoint lies on disk, so a cache made on one machine is recognised on another.
    """
    check_layout(spec)
    path = spec.path
    folders = {
        "scheduler": path / "scheduler",
        "text_encoder": path / "text_encoder",
        "tokenizer": path / "tokenizer",
        "vae": path / "vae",
        "unet": path / spec.unet_subfolder,
    }
    files = {}
    for name, folder in folders.items():
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            files[f"{name}/{f.name}"] = _sha256(f)
    options = {"use_metadata": spec.use_metadata, "num_metadata": spec.num_metadata if spec.use_metadata else 0}
    blob = json.dumps({"files": files, "options": options}, sort_keys=True).encode()
    return {"id": hashlib.sha256(blob).hexdigest()[:16], "files": files, "options": options}


def _weight_keys(weight_file: Path) -> list[str]:
    if weight_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weight_file), framework="pt") as f:
            return list(f.keys())
    state = torch.load(weight_file, map_location="meta", weights_only=True, mmap=True)
    return list(state.keys())


def _load_unet(spec: BackboneSpec, weight_file: Path):
    from .sat_unet import SatUNet

    if spec.use_metadata and not any(k.startswith("metadata_embedding.") for k in _weight_keys(weight_file)):
        raise BackboneError(
            f"{weight_file} holds no metadata_embedding weights but use_metadata is true; "
            "set use_metadata: false or use a checkpoint trained with metadata"
        )
    # A checkpoint with metadata weights loaded with use_metadata false drops them, as the
    # reference does; diffusers lists every dropped tensor, so say it once here instead.
    dl = logging.getLogger("diffusers.models.modeling_utils")
    level = dl.level
    dl.setLevel(logging.ERROR)
    try:
        unet = SatUNet.from_pretrained(
            str(spec.path),
            subfolder=spec.unet_subfolder,
            use_metadata=spec.use_metadata,
            num_metadata=spec.num_metadata,
            local_files_only=True,
            use_safetensors=weight_file.suffix == ".safetensors",
        )
    finally:
        dl.setLevel(level)
    if not spec.use_metadata:
        log.info("SatUNet loaded without metadata embedding (use_metadata: false)")
    return unet


def read_scheduler_config(spec: BackboneSpec) -> dict:
    """The stored scheduler config (any scheduler class: only its betas and spacing are used)."""
    check_layout(spec)
    return json.loads((spec.path / "scheduler" / "scheduler_config.json").read_text())


def load_diffusionsat(spec: BackboneSpec, device: str | torch.device = "cpu") -> DiffusionSat:
    """Build DiffusionSat from ``spec`` on ``device``, frozen and in eval mode."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    weight_file = check_layout(spec)
    path = spec.path
    unet = _load_unet(spec, weight_file)
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True)
    scheduler_config = read_scheduler_config(spec)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    model = DiffusionSat(unet, vae, text_encoder, tokenizer, scheduler_config, spec)
    return model.to(device)
