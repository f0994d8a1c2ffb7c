"""The ``device`` setting: what may be written, and the torch device it names on this machine.

torch is imported only when a device is resolved, so that configs are checked without it.
"""

from __future__ import annotations

import re

from .config import ConfigError

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
ALLOWED = "auto, cpu, cuda, cuda:N or mps"


def device_problem(name) -> str | None:
    """None when ``name`` is a device setting, else the text of what is allowed (for config checks)."""
    if not isinstance(name, str) or not DEVICE.match(name):
        return ALLOWED
    return None


def auto_device(cuda_devices: int) -> str:
    """What ``auto`` means on a machine with ``cuda_devices`` visible CUDA devices."""
    return "cuda" if cuda_devices else "cpu"


def resolve_device(name: str):
    """The torch device ``name`` names here; a ConfigError saying what to ask for instead when it is
    not a device setting or this machine lacks the device."""
    import torch

    if device_problem(str(name)):
        raise ConfigError(f"device {name!r} is not {ALLOWED}")
    if name == "auto":
        return torch.device(auto_device(torch.cuda.device_count() if torch.cuda.is_available() else 0))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device {name!r} was asked for but this machine has {count} CUDA device(s), "
                          f"cuda:0 to cuda:{count - 1}; use one of them or --device auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for but MPS (Apple silicon) is not available here; "
                          "use --device cpu or auto")
    return device
