import numpy as np
import pytest

from pipeline.backbone.schedule import Schedule, label_key, scheduler_config_problem

# SD-2.1's scheduler config as the DiffusionSat checkpoints store it (class and extra keys vary).
SD21_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}


def test_sd21_schedule_runs_981_to_1():
    s = Schedule.build(SD21_SCHEDULER, 50, [47, 45, 40])
    assert s.timesteps == tuple(range(981, 0, -20))


@pytest.mark.parametrize("cls", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_timestep_table_of_the_default_inversion(cls):
    s = Schedule.build({**SD21_SCHEDULER, "_class_name": cls}, 50, [47, 45, 40])
    assert s.table() == {"t47": 21, "t45": 61, "t40": 161}
    assert s.unet_passes == 10


def test_inversion_steps_start_at_minus_one_and_stop_after_last_label():
    steps = Schedule.build(SD21_SCHEDULER, 50, [47, 45, 40]).inversion_steps()
    assert [(st.t, st.t_next, st.label) for st in steps[:3]] == [(-1, 1, 49), (1, 21, 48), (21, 41, 47)]
    assert len(steps) == 10 and steps[-1].label == 40 and steps[-1].t == 161


def test_generation_labels_are_descending_schedule_positions():
    s = Schedule.build(SD21_SCHEDULER, 50, [47, 45, 40], mode="generation")
    assert s.table() == {"t47": 41, "t45": 81, "t40": 181}
    assert s.unet_passes == 3


def test_alpha_bar_is_one_before_the_first_step():
    s = Schedule.build(SD21_SCHEDULER, 50, [49])
    assert float(s.alpha_bar(-1)) == 1.0
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert float(s.alpha_bar(1)) == pytest.approx((1 - betas[0]) * (1 - betas[1]), rel=1e-6)
    assert s.unet_passes == 1 and s.table() == {"t49": -1}


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r"save_timesteps \[50\].*\[0, 49\]"):
        Schedule.build(SD21_SCHEDULER, 50, [50])
    with pytest.raises(ValueError, match="diffusion_mode"):
        Schedule.build(SD21_SCHEDULER, 50, [47], mode="sampling")


def test_label_key():
    assert label_key(47) == "t47"



def test_scheduler_config_problems():
    sd = SD21_SCHEDULER  # without timestep_spacing, as configs written before it existed
    assert scheduler_config_problem(sd) is None
    given = {"num_train_timesteps": 4, "steps_offset": 0, "trained_betas": [0.1, 0.2, 0.3, 0.4]}
    assert scheduler_config_problem(given) is None  # explicit betas need no beta_* keys
    assert Schedule.build(given, 2, (1,)).timesteps == (2, 0)
    assert scheduler_config_problem({k: v for k, v in sd.items() if k != "steps_offset"}) == (
        "lacks steps_offset, which the DDIM schedule is computed from")
    assert scheduler_config_problem(dict(sd, steps_offset=True)).startswith("num_train_timesteps 1000 and steps_offset True")
    assert scheduler_config_problem(dict(sd, timestep_spacing="even")).startswith("timestep_spacing 'even' is not one of")
    assert scheduler_config_problem(dict(sd, beta_end="0.012")) == "beta_start 0.00085 and beta_end '0.012' must be numbers"
    assert scheduler_config_problem(dict(given, trained_betas=[0.1])) == (
        "trained_betas must be a list of num_train_timesteps (4) numbers")
