"""A tiny, randomly initialised DiffusionSat written in the published checkpoint layout.

It has the real architecture (SD-2.1 block types, linear-projection transformers, metadata MLPs)
at toy widths, so everything that reads a checkpoint (``load_diffusionsat``, the fingerprint, the
extractor's hooks) can be exercised in seconds and without downloading the real 3.5 GB release.
Its features mean nothing. Every component is initialised from its own seed, so two builds with
the same seed write byte-identical weight files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..outputs import output_folder
from .loader import BackboneSpec

# Stable Diffusion 2.1's UNet, as DiffusionSat fine-tuned it (sample_size 32 = 256 px / 8).
# diffusers' "attention_head_dim" is, for this model, the number of heads per block.
SD21_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "upcast_attention": True,
    "use_metadata": True,
    "num_metadata": 7,
}

# SD-2.1-base's scheduler; DiffusionSat kept it. _class_name is filled in per build.
SD21_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# A few merges so the tokenizer exercises BPE; each result is added to the vocabulary.
DEMO_MERGES = (("a", "t"), ("e", "l"), ("i", "t"), ("at", "el"), ("t", "e</w>"))
MAX_TOKENS = 77


def tiny_unet_config(**overrides) -> dict:
    """SD-2.1's UNet structure at toy widths: same blocks, attention and metadata, 8-dim heads."""
    config = dict(SD21_UNET_CONFIG)
    config.update(
        sample_size=16,
        block_out_channels=(16, 32, 32, 32),
        attention_head_dim=(2, 4, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    config.update(overrides)
    return config


def tiny_vae_config(img_size: int, full_size: bool = False) -> dict:
    """SD's VAE (``full_size``) or a toy one; four blocks give three downsamplings, so the latent
    is img_size / 8 in both."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512) if full_size else (8, 16, 16, 16),
        "layers_per_block": 2 if full_size else 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32 if full_size else 8,
        "sample_size": img_size,
        "scaling_factor": 0.18215,
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tokenizer_vocab() -> dict:
    # CLIP's byte-level BPE without its 49k learned merges: every byte, alone and word-final.
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = list(SPECIAL_TOKENS) + chars + [c + "</w>" for c in chars]
    tokens += ["".join(pair) for pair in DEMO_MERGES]
    return {t: i for i, t in enumerate(tokens)}


def _write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab = _tokenizer_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(DEMO_MERGES), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(folder))
    # The released tokenizer folder has vocab.json + merges.txt and no tokenizer.json; keep that
    # shape so loading goes the same way as with the real checkpoint.
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = "".join(f"{a} {b}\n" for a, b in DEMO_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges)


def _write_text_encoder(folder: Path, width: int, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _tokenizer_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        bos_token_id=vocab[SPECIAL_TOKENS[0]],
        eos_token_id=vocab[SPECIAL_TOKENS[1]],
        pad_token_id=vocab[SPECIAL_TOKENS[1]],
    )
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(str(folder))


def _write_vae(folder: Path, img_size: int, seed: int, full_size: bool = False) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(img_size, full_size))
    # Shape the random posterior like a trained one. A trained VAE's posterior is narrow; a random
    # one has std ~1, whose sampling noise would drown the image, so the log-variance is a constant
    # -12 (std ~0.0025). Its mean is scaled so that latents x 0.18215 have std ~1 (measured 0.98
    # on the demo task), the range SD's UNet expects, instead of ~0.03.
    half = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -12.0
        vae.quant_conv.weight[:half] *= 30.0
        vae.quant_conv.bias[:half] *= 30.0
    vae.save_pretrained(str(folder))


def _write_unet(folder: Path, config: dict, weights: str, seed: int) -> None:
    from .sat_unet import SatUNet

    torch.manual_seed(seed)
    unet = SatUNet(**config)
    if weights == "safetensors":
        unet.save_pretrained(str(folder), safe_serialization=True)
        return
    # Older DiffusionSat checkpoints ship a pickled state dict instead of safetensors.
    unet.save_config(str(folder))
    state = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    torch.save(state, folder / "diffusion_pytorch_model.bin")


def _model_index(scheduler_class: str) -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_demo_backbone(
    root,
    img_size: int = 128,
    seed: int = 0,
    weights: str = "safetensors",
    with_metadata: bool = True,
    scheduler_class: str = "PNDMScheduler",
    resolution_subfolder: str | None = None,
    unet_subfolder: str = "checkpoint-150000/unet",
    overwrite: bool = False,
    full_size: bool = False,
) -> Path:
    """Write a tiny DiffusionSat under ``root`` and return its resolution folder.

    ``full_size`` writes SD-2.1's real UNet and VAE widths instead (3.5 GB of random weights; the
    text encoder stays small, it runs once per extraction): for speed and memory measurements.
    """
    if weights not in ("safetensors", "bin"):
        raise UserError(f"weights must be 'safetensors' or 'bin', not {weights!r}")
    if img_size < 8 or img_size % 8:
        raise UserError(f"img_size (--img-size) must be a positive multiple of 8 (the VAE downsamples by 8), "
                        f"not {img_size}; e.g. 64 or 128")
    output_folder(root)
    spec = BackboneSpec(Path(root), img_size, resolution_subfolder, unet_subfolder)
    path = spec.path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        if path == Path(root):
            raise UserError(f"refusing to delete the root folder {path}; use a resolution subfolder")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)

    sizes = {"sample_size": img_size // 8, "use_metadata": with_metadata}
    unet_config = {**SD21_UNET_CONFIG, **sizes} if full_size else tiny_unet_config(**sizes)
    _write_json(path / "model_index.json", _model_index(scheduler_class))
    scheduler = {"_class_name": scheduler_class, **SD21_SCHEDULER_CONFIG}
    _write_json(path / "scheduler" / "scheduler_config.json", scheduler)
    _write_tokenizer(path / "tokenizer")
    _write_text_encoder(path / "text_encoder", unet_config["cross_attention_dim"], seed)
    _write_vae(path / "vae", img_size, seed + 1, full_size)
    _write_unet(path / unet_subfolder, unet_config, weights, seed + 2)
    return path
