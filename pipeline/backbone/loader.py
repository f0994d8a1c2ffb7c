"""Load a DiffusionSat checkpoint from the published folder layout.

The released checkpoints (Zenodo records 13756199 at 256 px, 13751498 at 512 px) unpack to::

    <root>/resolution256/
        model_index.json
        scheduler/scheduler_config.json
        text_encoder/{config.json, model.safetensors | pytorch_model.bin}
        tokenizer/{vocab.json, merges.txt, ...}
        vae/{config.json, diffusion_pytorch_model.(safetensors|bin)}
        checkpoint-150000/unet/{config.json, diffusion_pytorch_model.(safetensors|bin)}

(``checkpoint-150000/`` is an accelerate training checkpoint: ``unet_ema/``, ``optimizer.bin``,
``scheduler.bin`` and ``random_states_0.pkl`` lie beside ``unet/`` and are not read.)

Everything is read with ``local_files_only``: nothing is downloaded. Every file is checked before
anything is built (JSON parsed, weight headers read, tokenizer files read), so a damaged file
stops the run with one line naming it; each model is built in float32 whatever dtype its weights
were stored in (the extractor applies autocast on CUDA), and a weight the model needs but the file
lacks is an error, not a randomly initialised tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .schedule import scheduler_config_problem

log = logging.getLogger(__name__)

# Each component's weight file names, preferred first: the UNet's and VAE's, the text encoder's.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
RESTORE = "restore it from the DiffusionSat download (Zenodo 13756199 for 256 px, 13751498 for 512 px)"
# What the libraries raise for files they cannot use.
LIBRARY_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError)
METADATA_KEY = re.compile(r"^metadata_embedding\.(\d+)\.")


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

    def to(self, device: torch.device | str) -> DiffusionSat:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def _layout_text(spec: BackboneSpec) -> str:
    return (
        f"expected {spec.path}/ holding model_index.json, scheduler/, text_encoder/, tokenizer/, "
        f"vae/ and {spec.unet_subfolder}/{{config.json, {DIFFUSERS_WEIGHTS[0]} or {DIFFUSERS_WEIGHTS[1]}}}"
    )


def _required(spec: BackboneSpec) -> list[tuple[str, ...]]:
    """Files the loader reads, each as alternatives (any one will do)."""
    unet = spec.unet_subfolder
    return [
        ("model_index.json",),
        ("scheduler/scheduler_config.json",),
        ("text_encoder/config.json",),
        tuple("text_encoder/" + name for name in TEXT_ENCODER_WEIGHTS),
        ("tokenizer/vocab.json", "tokenizer/tokenizer.json"),
        ("vae/config.json",),
        ("vae/" + DIFFUSERS_WEIGHTS[0], "vae/" + DIFFUSERS_WEIGHTS[1]),
        (f"{unet}/config.json",),
        (f"{unet}/{DIFFUSERS_WEIGHTS[0]}", f"{unet}/{DIFFUSERS_WEIGHTS[1]}"),
    ]


@dataclass(frozen=True)
class WeightFile:
    """One component's weight file and the tensor names its header lists."""

    path: Path
    keys: tuple[str, ...]

    @property
    def safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"


@dataclass(frozen=True)
class CheckpointFiles:
    unet: WeightFile
    vae: WeightFile
    text_encoder: WeightFile


def check_layout(spec: BackboneSpec) -> CheckpointFiles:
    """Check every file the loader reads, cheaply, and return the weight files.

    Raises a BackboneError naming the first missing or damaged file. JSON files are parsed,
    weight files' headers read (not their tensors) and the tokenizer's files read.
    """
    _check_present(spec)
    path = spec.path
    configs = ["model_index.json", "text_encoder/config.json", "vae/config.json", f"{spec.unet_subfolder}/config.json"]
    for name in configs:
        _read_mapping(path / name)
    _scheduler_config(path)
    _check_tokenizer(path / "tokenizer")
    return CheckpointFiles(
        unet=_weight_file(path / spec.unet_subfolder, DIFFUSERS_WEIGHTS),
        vae=_weight_file(path / "vae", DIFFUSERS_WEIGHTS),
        text_encoder=_weight_file(path / "text_encoder", TEXT_ENCODER_WEIGHTS),
    )


def _check_present(spec: BackboneSpec) -> None:
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


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BackboneError(f"{path} is not UTF-8 text, so not JSON: it is corrupt; {RESTORE}") from None
    except json.JSONDecodeError as err:
        raise BackboneError(
            f"{path} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}): "
            f"it is truncated or corrupt; {RESTORE}"
        ) from None


def _read_mapping(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise BackboneError(
            f"{path} holds a JSON {type(data).__name__} where an object of settings is expected: "
            f"it is not the file the checkpoint ships; {RESTORE}"
        )
    return data


def _scheduler_config(path: Path) -> dict:
    file = path / "scheduler" / "scheduler_config.json"
    config = _read_mapping(file)
    problem = scheduler_config_problem(config)
    if problem:
        raise BackboneError(
            f"{file} {problem}; {RESTORE} or write SD-2.1's values (beta_schedule scaled_linear, "
            "beta_start 0.00085, beta_end 0.012, steps_offset 1)"
        )
    return config


def _check_tokenizer(folder: Path) -> None:
    """The tokenizer's JSON files and its BPE merges, as the tokenizer library would read them."""
    parsed = {file.name: _read_mapping(file) for file in sorted(folder.glob("*.json"))}
    vocab = parsed.get("vocab.json")
    if vocab is None:
        return  # a tokenizer.json alone holds vocabulary and merges, and it parsed
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        raise BackboneError(
            f"{folder / 'vocab.json'} maps {bad!r} to {vocab[bad]!r}, not to a token id: it is not a BPE "
            f"vocabulary; {RESTORE}"
        )
    merges = folder / "merges.txt"
    if not merges.is_file():
        raise BackboneError(f"{merges} is missing (vocab.json needs it); {RESTORE}")
    problem = _merges_problem(merges, vocab)
    if problem:
        raise BackboneError(f"{merges} {problem}: it is truncated or corrupt; {RESTORE}")


def _merges_problem(path: Path, vocab: dict) -> str | None:
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    for number, line in enumerate(lines, start=1):
        if line.startswith("#version"):  # the header, skipped wherever it is, as tokenizers does
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            return f"line {number} is {line[:40]!r}, not two tokens separated by a space"
        unknown = [t for t in (*parts, "".join(parts)) if t not in vocab]
        if unknown:
            return f"line {number} merges {line!r} but vocab.json has no token {unknown[0]!r}"
    return None


def _weight_file(folder: Path, names: tuple[str, ...]) -> WeightFile:
    path = next(folder / name for name in names if (folder / name).is_file())
    return WeightFile(path, _weight_keys(path))


def _weight_keys(path: Path) -> tuple[str, ...]:
    """Tensor names from a weight file's header; its tensors are not read."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return tuple(f.keys())
        except SafetensorError as err:
            reason = str(err).removeprefix("Error while deserializing header: ")
            raise _damaged(path, f"not a readable safetensors file ({reason})") from None
    # torch.save writes a zip archive whose directory is at its end: a truncated file has none.
    if not zipfile.is_zipfile(path):
        raise _damaged(path, "not a torch.save zip archive")
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except LIBRARY_ERRORS as err:
        raise _damaged(path, f"not a readable torch state dict ({str(err).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _damaged(path, f"a {type(state).__name__} of other things, not a state dict of tensors")
    return tuple(state)


def _damaged(path: Path, what: str) -> BackboneError:
    return BackboneError(f"{path} is {what}: it is truncated or corrupt; {RESTORE}")


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


def _check_metadata(spec: BackboneSpec, weights: WeightFile) -> None:
    """The metadata MLPs in the weights against use_metadata / num_metadata, before building."""
    held = {int(m.group(1)) for m in map(METADATA_KEY.match, weights.keys) if m}
    if spec.use_metadata and not held:
        raise BackboneError(
            f"{weights.path} holds no metadata_embedding weights but use_metadata is true; "
            "set use_metadata: false or use a checkpoint trained with metadata"
        )
    if spec.use_metadata and len(held) != spec.num_metadata:
        raise BackboneError(
            f"{weights.path} holds {len(held)} metadata MLPs (metadata_embedding.N) but num_metadata is "
            f"{spec.num_metadata}; set num_metadata: {len(held)} (or use_metadata: false to drop them)"
        )
    if held and not spec.use_metadata:
        # As the reference does; SatUNet drops them without diffusers listing every tensor.
        log.info("use_metadata is false: the %d metadata MLPs of %s are not used", len(held), weights.path)


@contextmanager
def _building(folder: Path, what: str):
    """Errors of the libraries while building a model from files that passed the checks (a config
    that does not fit its weights, a damaged tensor) as one line naming the folder."""
    from safetensors import SafetensorError

    try:
        yield
    except Exception as err:
        # The tokenizers library raises bare Exceptions for a vocabulary or merges it cannot use.
        if not isinstance(err, (*LIBRARY_ERRORS, SafetensorError)) and type(err) is not Exception:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        reason = f"{type(err).__name__}: {first.split('. ')[0][:200]}"  # the rest is advice on library options
        raise BackboneError(
            f"{folder}: the {what} cannot be built from its files ({reason}); they do not belong together "
            f"or are damaged; {RESTORE}"
        ) from None


def _check_loaded(weights: WeightFile, info: dict) -> None:
    """A weight the model needs that the file lacks would be left random (or on the meta device)."""
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise BackboneError(
            f"{weights.path} lacks {len(missing)} weight{'s' if len(missing) > 1 else ''} that the model built "
            f"from its config.json needs ({shown}): the file is incomplete or belongs to another model; {RESTORE}"
        )


def _load_model(cls, weights: WeightFile, what: str, **kwargs):
    folder = weights.path.parent
    with _building(folder, what):
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=weights.safetensors, output_loading_info=True,
            **kwargs,
        )
    _check_loaded(weights, info)
    return model


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    with _building(folder, "tokenizer"):
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def read_model_configs(spec: BackboneSpec) -> tuple[dict, dict]:
    """The UNet's and the scheduler's stored configs, checked, without the rest of the checkpoint:
    enough to plan a cache's shapes and passes before the weights are downloaded or read."""
    path = spec.path
    if not path.is_dir():
        raise BackboneError(f"DiffusionSat checkpoint folder {path} does not exist: {_layout_text(spec)}; download "
                            "DiffusionSat (Zenodo 13756199 for 256 px, 13751498 for 512 px) or set "
                            "pretrained_model_name_or_path / resolution_subfolder")
    unet = path / spec.unet_subfolder / "config.json"
    for file in (unet, path / "scheduler" / "scheduler_config.json"):
        if not file.is_file():
            raise BackboneError(f"{file} is missing: {_layout_text(spec)}; {RESTORE} or set unet_subfolder")
    return _read_mapping(unet), _scheduler_config(path)


def read_scheduler_config(spec: BackboneSpec) -> dict:
    """The stored scheduler config (any scheduler class: only its betas and spacing are used)."""
    check_layout(spec)
    return _scheduler_config(spec.path)


def load_diffusionsat(spec: BackboneSpec, device: str | torch.device = "cpu") -> DiffusionSat:
    """Build DiffusionSat from ``spec`` on ``device``, frozen and in eval mode."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from .sat_unet import SatUNet

    files = check_layout(spec)
    _check_metadata(spec, files.unet)
    path = spec.path
    # float32 whatever dtype the weights were stored in: on CPU a float16 text encoder or VAE would
    # not run beside float32 inputs; on CUDA the extractor applies autocast, as the reference does.
    unet = _load_model(
        SatUNet, files.unet, "UNet", torch_dtype=torch.float32,
        use_metadata=spec.use_metadata, num_metadata=spec.num_metadata,
    )
    vae = _load_model(AutoencoderKL, files.vae, "VAE", torch_dtype=torch.float32)
    text_encoder = _load_model(CLIPTextModel, files.text_encoder, "text encoder", dtype=torch.float32)
    tokenizer = _load_tokenizer(path / "tokenizer")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    model = DiffusionSat(unet, vae, text_encoder, tokenizer, _scheduler_config(path), spec)
    return model.to(device)
