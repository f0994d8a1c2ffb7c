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


# What the schedule is computed from. DDIMScheduler's defaults for these are not SD's (linear
# betas 1e-4 to 0.02, no step offset), so a config lacking one would silently give another schedule.
# ``timestep_spacing`` is not among them: configs written before it existed meant its default.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # DDIMScheduler's
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def scheduler_config_problem(config: dict) -> str | None:
    """Why ``config`` cannot give the schedule, or None when it can."""
    betas_given = config.get("trained_betas") is not None
    needed = ("num_train_timesteps", "steps_offset") if betas_given else SCHEDULE_KEYS
    missing = [key for key in needed if key not in config]
    if missing:
        return f"lacks {', '.join(missing)}, which the DDIM schedule is computed from"
    n, offset = config["num_train_timesteps"], config["steps_offset"]
    if not (_is_int(n) and n >= 1 and _is_int(offset) and offset >= 0):
        return f"num_train_timesteps {n!r} and steps_offset {offset!r} must be whole numbers (>= 1 and >= 0)"
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        return f"timestep_spacing {spacing!r} is not one of {list(TIMESTEP_SPACINGS)}"
    if betas_given:
        betas = config["trained_betas"]
        ok = isinstance(betas, list) and len(betas) == n and all(_is_number(b) for b in betas)
        return None if ok else f"trained_betas must be a list of num_train_timesteps ({n}) numbers"
    start, end = config["beta_start"], config["beta_end"]
    if not (_is_number(start) and _is_number(end)):
        return f"beta_start {start!r} and beta_end {end!r} must be numbers"
    if config["beta_schedule"] not in BETA_SCHEDULES:
        return f"beta_schedule {config['beta_schedule']!r} is not one of {list(BETA_SCHEDULES)}"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        return unet_passes(self.mode, self.num_timesteps, self.save_timesteps)

    def alpha_bar(self, t: int) -> torch.Tensor:
        return torch.ones(()) if t == -1 else self.alphas_cumprod[t]


def label_key(label: int) -> str:
    """Cache key of a save_timesteps label: 47 -> 't47'."""
    return f"t{int(label)}"


def label_of(key: str, num_timesteps: int) -> int:
    """The save_timesteps label of a cache key ('t47' -> 47), refused outside the schedule's labels."""
    label = int(key[1:]) if key[:1] == "t" and key[1:].isdigit() else -1
    if not 0 <= label < num_timesteps:
        raise UserError(f"{key!r} is not a timestep key of a {num_timesteps}-step schedule ('t0' to "
                        f"'t{num_timesteps - 1}')")
    return label


def unet_passes(mode: str, num_timesteps: int, save_timesteps) -> int:
    """UNet passes per image that computes the features of ``save_timesteps``: the inversion runs
    every step up to the last saved label; noised latents need one pass per label."""
    if mode == "generation":
        return len(set(save_timesteps))
    return num_timesteps - min(save_timesteps)
