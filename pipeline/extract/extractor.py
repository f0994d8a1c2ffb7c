"""The reference's feature extraction: VAE latent, DDIM inversion (or one-step noising), hooks.

What follows the reference exactly: images in [-1, 1] are VAE-encoded and scaled by 0.18215; the
prompt is tokenised to 77 tokens with max-length padding; the inversion's first UNet call is at
timestep -1 on the clean latent; the UNet output is used as epsilon with eta 0; features are the
hooked layer outputs of the call whose label is saved; on CUDA the UNet and text encoder run under
fp16 autocast (bf16 optional), on CPU in fp32.

What is ours, on purpose: the latent sample and the generation noise are drawn from a generator
seeded by (seed, sample name), so a feature never depends on batch size or order (the reference
draws them from one generator shared by the whole run); generation mode saves every label of
``save_timesteps``, one UNet pass each (the reference saves only the smallest).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..backbone.layer_spec import DEFAULT_LAYER_IDXS
from ..backbone.layers import ForwardStopped, Layer, as_map, capture, catalog, select_layers
from ..backbone.loader import DiffusionSat
from ..backbone.schedule import Schedule, label_key, label_of
from ..cache.layout import TIERS
from ..errors import UserError

# Bumped whenever a change to this module changes the numbers it produces, so that caches made
# by the earlier code are not taken for current ones.
EXTRACTION_VERSION = 1
LATENT_SCALE = 0.18215
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


@dataclass(frozen=True)
class ExtractionSettings:
    mode: str = "inversion"
    num_timesteps: int = 50
    save_timesteps: tuple[int, ...] = (47, 45, 40)
    layer_idxs: dict = field(default_factory=lambda: DEFAULT_LAYER_IDXS)
    prompt: str = "A satellite image"
    latent: str = "sample"  # "sample" (reference) or "mean"
    seed: int = 42
    autocast: str = "fp16"  # used on CUDA only
    metadata: tuple[float, ...] | None = None  # used when the UNet has use_metadata


@dataclass
class BatchFeatures:
    """Everything extraction produces for one batch, on the CPU."""

    latents: torch.Tensor  # (B, 4, h, w) float32
    maps: dict[str, dict[str, torch.Tensor]]  # label key -> layer -> (B, C, H, W) float16
    pooled: dict[str, dict[str, torch.Tensor]]  # label key -> layer -> (B, C) float32
    trajectory: dict[str, torch.Tensor]  # label key -> UNet input x_t (B, 4, h, w) float32


def precision(device: torch.device | str, autocast: str) -> str:
    """How the UNet computes on ``device``: autocast applies on CUDA only."""
    device_type = torch.device(device).type
    if device_type == "cuda" and AUTOCAST_DTYPES[autocast] is not None:
        return f"cuda-{autocast}-autocast"
    return f"{device_type}-fp32"


def sample_seed(seed: int, name: str, stream: str) -> int:
    """A 63-bit seed from the run seed and a sample's name: same draw in any batch, any order."""
    digest = hashlib.sha256(f"{seed}/{stream}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_normal(shape, names, seed: int, stream: str) -> torch.Tensor:
    draws = []
    for name in names:
        gen = torch.Generator().manual_seed(sample_seed(seed, name, stream))
        draws.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(draws)


def encode_prompt(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    tokens = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(device))[0]


class FeatureExtractor:
    """Runs the extraction for batches of images on the model's device."""

    def __init__(self, model: DiffusionSat, settings: ExtractionSettings):
        if settings.latent not in ("sample", "mean"):
            raise UserError(f"latent {settings.latent!r} is not 'sample' or 'mean'")
        if settings.autocast not in AUTOCAST_DTYPES:
            raise UserError(f"autocast {settings.autocast!r} is not one of {list(AUTOCAST_DTYPES)}")
        self.model = model
        self.settings = settings
        self.device = model.device
        self.schedule = Schedule.build(
            model.scheduler_config, settings.num_timesteps, settings.save_timesteps, settings.mode
        )
        self.layers: list[Layer] = select_layers(model.unet, settings.layer_idxs)
        # What the UNet has for the selection's blocks and suffixes; stored in the cache, so that a
        # fit resolves its own selection exactly (layer_spec).
        self.catalog = catalog(model.unet, settings.layer_idxs)
        with torch.no_grad(), self._autocast():
            self.cond = encode_prompt(model.tokenizer, model.text_encoder, settings.prompt, self.device)
        self._metadata = self._metadata_vector()

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def _autocast(self):
        if not precision(self.device, self.settings.autocast).endswith("-autocast"):
            return nullcontext()
        return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[self.settings.autocast])

    def _metadata_vector(self) -> torch.Tensor | None:
        unet = self.model.unet
        if getattr(unet, "metadata_embedding", None) is None:
            return None
        num = unet.config.num_metadata
        values = self.settings.metadata or (0.0,) * num
        if len(values) != num:
            raise UserError(f"metadata has {len(values)} values; the UNet expects num_metadata={num}")
        return torch.tensor(values, dtype=torch.float32, device=self.device)[None]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, names: list[str]) -> torch.Tensor:
        """VAE latents of images in [-1, 1], scaled as the reference does."""
        dist = self.model.vae.encode(images.to(self.device, torch.float32)).latent_dist
        if self.settings.latent == "mean":
            z = dist.mean
        else:
            eps = seeded_normal(dist.mean.shape[1:], names, self.settings.seed, "latent")
            z = dist.mean + dist.std * eps.to(self.device)
        return z * LATENT_SCALE

    def _unet(self, x: torch.Tensor, t: int) -> torch.Tensor:
        n = x.shape[0]
        timestep = torch.full((n,), float(t), device=self.device)
        kwargs = {}
        if self._metadata is not None:
            kwargs["metadata"] = self._metadata.expand(n, -1)
        cond = self.cond.expand(n, *self.cond.shape[1:])
        with self._autocast():
            return self.model.unet(x, timestep, encoder_hidden_states=cond, **kwargs).sample

    def unet_passes(self, tiers=TIERS) -> int:
        """UNet passes per image for an extraction that keeps ``tiers``: the inversion needs every
        step's noise prediction, but noised latents need the UNet only for the features."""
        if self.schedule.mode != "inversion" and not {"maps", "pooled"} & set(tiers):
            return 0
        return self.schedule.unet_passes

    @torch.no_grad()
    def features(self, latents: torch.Tensor, names: list[str], tiers=TIERS) -> BatchFeatures:
        """What ``tiers`` hold for a batch of latents; the tiers not asked for come back empty. Only
        the layers' outputs a tier keeps are copied off the UNet: at 256 px the maps are 20 MiB per
        image, which a trajectory-only extraction then never holds."""
        maps, pooled, trajectory = {}, {}, {}
        want_maps, want_pooled = "maps" in tiers, "pooled" in tiers

        def keep(label: int, x: torch.Tensor, store: dict):
            key = label_key(label)
            trajectory[key] = x.float().cpu()
            maps[key], pooled[key] = {}, {}
            for name in self.layer_names if want_maps or want_pooled else ():
                fmap = as_map(store[name])
                if want_pooled:
                    pooled[key][name] = fmap.float().mean(dim=(2, 3)).cpu()
                if want_maps:
                    maps[key][name] = fmap.to(torch.float16).cpu()

        latents = latents.to(self.device, torch.float32)
        saved = set(self.schedule.save_timesteps)
        hooked = self.layers if want_maps or want_pooled else []
        with capture(hooked) as store:
            if self.schedule.mode == "inversion":
                x = latents
                for step in self.schedule.inversion_steps():
                    eps = self._unet(x, step.t).float()
                    if step.label in saved:
                        keep(step.label, x, store)
                    x = self._ddim_step(x, eps, step.t, step.t_next)
            else:
                noise = seeded_normal(latents.shape[1:], names, self.settings.seed, "noise").to(self.device)
                for label in sorted(saved, reverse=True):
                    t = self.schedule.timesteps[label]
                    x = self._add_noise(latents, noise, t)
                    if hooked:
                        self._unet(x, t)
                    keep(label, x, store)
        return BatchFeatures(latents.cpu(), maps, pooled, trajectory)

    @torch.no_grad()
    def from_trajectory(self, trajectory: dict[str, torch.Tensor], layers: list[str] | None = None,
                        pooled: bool = False, on_device: bool = False) -> tuple[dict, dict]:
        """The maps (and, with ``pooled``, the pooled vectors) ``features`` makes, from the stored UNet
        input x_t of each label: one UNet pass per label at that label's timestep, with only ``layers``
        (default: all selected) hooked and the pass stopped after the last of them. Returns
        ``(maps, pooled)`` keyed like ``BatchFeatures``; on the CPU unless ``on_device``."""
        names = self.layer_names if layers is None else list(layers)
        by_name = {layer.name: layer for layer in self.layers}
        unknown = [name for name in names if name not in by_name]
        if unknown or not names:
            raise UserError(f"layers {unknown or '[]'} are not among the {len(by_name)} layers of the extraction's "
                            "layer_idxs; ask for some of those")
        hooked = [by_name[name] for name in names]
        out = (lambda x: x) if on_device else (lambda x: x.cpu())  # noqa: E731
        maps, pools = {}, {}
        for key, x in trajectory.items():
            t = self.schedule.unet_timestep(label_of(key, self.schedule.num_timesteps))
            store = self._stopped_pass(x.to(self.device, torch.float32), t, hooked)
            maps[key] = {name: out(as_map(store[name]).to(torch.float16)) for name in names}
            if pooled:
                pools[key] = {name: out(as_map(store[name]).float().mean(dim=(2, 3))) for name in names}
        return maps, pools

    def _stopped_pass(self, x: torch.Tensor, t: int, layers: list[Layer]) -> dict[str, torch.Tensor]:
        with capture(layers, stop=True) as store:
            try:
                self._unet(x, t)
            except ForwardStopped:
                pass
        return store

    def _ddim_step(self, x, eps, t: int, t_next: int) -> torch.Tensor:
        at = self.schedule.alpha_bar(t).to(self.device)
        at_next = self.schedule.alpha_bar(t_next).to(self.device)
        x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()
        return at_next.sqrt() * x0 + (1 - at_next).sqrt() * eps

    def _add_noise(self, x0, noise, t: int) -> torch.Tensor:
        # The formula of diffusers' DDIMScheduler.add_noise, which the reference calls.
        at = self.schedule.alphas_cumprod[t].to(self.device)
        return at**0.5 * x0 + (1 - at) ** 0.5 * noise

    def __call__(self, images: torch.Tensor, names: list[str], tiers=TIERS) -> BatchFeatures:
        return self.features(self.encode(images, names), names, tiers)

    @torch.no_grad()
    def layer_shapes(self, latent_size: int) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of every selected layer for a latent of the given size."""
        return layer_shapes(self.model.unet, self.layers, latent_size, self.cond.shape[-1], self.device)


def layer_shapes(unet, layers: list[Layer], latent_size: int, cond_dim: int, device) -> dict:
    """Shapes from one forward pass; works on the meta device, so a full-size UNet costs nothing."""
    x = torch.zeros(1, unet.config.in_channels, latent_size, latent_size, device=device)
    cond = torch.zeros(1, 77, cond_dim, device=device)
    with torch.no_grad(), capture(layers) as store:
        unet(x, torch.ones(1, device=device), encoder_hidden_states=cond)
    return {layer.name: tuple(as_map(store[layer.name]).shape[1:]) for layer in layers}
