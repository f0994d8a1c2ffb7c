"""The DDIM timestep schedule of the reference's inversion and its ``save_timesteps`` labels.

The reference sets ``num_timesteps`` DDIM steps on the checkpoint's scheduler config (SD-2.1's
gives 981, 961, ..., 1 for 50 steps) and walks them upwards. Step ``i`` calls the UNet at the
previous timestep of that walk, so the first call is at timestep -1 on the clean latent (its
alpha-bar taken as 1), and features of step ``i`` carry the label ``num_timesteps - 1 - i``. The
walk stops after ``num_timesteps - min(save_timesteps)`` steps. Under the default 50-step schedule
the labels 47, 45 and 40 are UNet timesteps 21, 61 and 161.

In generation mode a label ``l`` is the timestep ``timesteps[l]`` of the descending schedule (181
for label 40), reached by noising the latent directly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import UserError

MODES = ("inversion", "generation")


def ddim_scheduler(scheduler_config: dict):
    """A DDIMScheduler with the betas, offset and spacing of any stored scheduler config."""
    from diffusers import DDIMScheduler

    known = set(inspect.signature(DDIMScheduler.__init__).parameters)
    return DDIMScheduler.from_config({k: v for k, v in scheduler_config.items() if k in known})


@dataclass(frozen=True)
class InversionStep:
    index: int
    t: int  # UNet timestep of this call (-1 for the first)
    t_next: int
    label: int


@dataclass(frozen=True)
class Schedule:
    mode: str
    num_timesteps: int
    save_timesteps: tuple[int, ...]
    timesteps: tuple[int, ...]  # descending, as the scheduler gives them
    alphas_cumprod: torch.Tensor  # float32, (num_train_timesteps,)

    @classmethod
    def build(cls, scheduler_config: dict, num_timesteps: int, save_timesteps, mode: str = "inversion"):
        if mode not in MODES:
            raise UserError(f"diffusion_mode {mode!r} is not one of {MODES}")
        labels = tuple(int(s) for s in save_timesteps)
        bad = [s for s in labels if not 0 <= s < num_timesteps]
        if not labels or bad:
            raise UserError(
                f"save_timesteps {list(labels)} must be non-empty labels in [0, {num_timesteps - 1}] "
                f"for num_timesteps {num_timesteps}"
            )
        scheduler = ddim_scheduler(scheduler_config)
        scheduler.set_timesteps(num_timesteps)
        alphas_cumprod = (1 - scheduler.betas.float()).cumprod(dim=0)
        timesteps = tuple(int(t) for t in scheduler.timesteps)
        return cls(mode, num_timesteps, labels, timesteps, alphas_cumprod)

    def inversion_steps(self) -> list[InversionStep]:
        """The UNet calls of the inversion, up to the last one whose features are saved."""
        ascending = list(reversed(self.timesteps))
        previous = [-1] + ascending[:-1]
        n_steps = self.num_timesteps - min(self.save_timesteps)
        return [
            InversionStep(i, previous[i], ascending[i], self.num_timesteps - 1 - i) for i in range(n_steps)
        ]

    def unet_timestep(self, label: int) -> int:
        """The UNet timestep at which features of ``label`` are taken in this mode."""
        if self.mode == "generation":
            return self.timesteps[label]
        step = self.num_timesteps - 1 - label
        return -1 if step == 0 else list(reversed(self.timesteps))[step - 1]

    def table(self) -> dict[str, int]:
        return {label_key(s): self.unet_timestep(s) for s in self.save_timesteps}

    @property
    def unet_passes(self) -> int:
        """UNet passes per image: the inversion runs every step up to the last saved label."""
        if self.mode == "generation":
            return len(set(self.save_timesteps))
        return self.num_timesteps - min(self.save_timesteps)

    def alpha_bar(self, t: int) -> torch.Tensor:
        return torch.ones(()) if t == -1 else self.alphas_cumprod[t]


def label_key(label: int) -> str:
    """Cache key of a save_timesteps label: 47 -> 't47'."""
    return f"t{int(label)}"
