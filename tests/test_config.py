import shutil

import pytest

from pipeline.config import ConfigError, load_config

REFERENCE_EXPS = ["eurosat", "ben", "chesa", "nzcattle"]


@pytest.mark.parametrize("name", REFERENCE_EXPS + ["demo_cls", "demo_seg"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}_exp.yaml")
    assert cfg.save_timesteps == [47, 45, 40] and cfg.num_timesteps == 50
    assert cfg.layer_idxs == {"up_blocks": {"attn1": "all", "conv2": "all"}}
    assert cfg.projection_dim == (128 if name.startswith("demo") else 384) and cfg.diffusion_mode == "inversion"


def test_reference_values_survive_the_merge():
    cfg = load_config("configs/chesa_exp.yaml")
    assert (cfg.dataset_name, cfg.task, cfg.num_classes) == ("mchesapeake", "segmentation", 7)
    assert (cfg.op_weight_decay, cfg.batch_size, cfg.eval_every_n_steps) == (0.0001, 64, 50)
    assert cfg.pool_scales == [1, 2, 3, 6] and cfg.channels == 512
    assert cfg.cache_path("train") == "cache/mchesapeake/train.zarr"


def test_a_segmentation_head_outputs_label_maps_of_the_patch_size():
    assert load_config("configs/chesa_exp.yaml", {"original_img_size": 48}).output_shape == (48, 48)
    assert load_config("configs/eurosat_exp.yaml").output_shape is None


def test_reference_experiment_file_runs_unchanged(tmp_path):
    # An experiment file as the reference writes it, dropped next to our configs, wandb and all.
    shutil.copytree("configs", tmp_path / "configs")
    exp = tmp_path / "configs" / "my_exp.yaml"
    exp.write_text(
        "lr: 0.01\nreport_to: wandb\nwandb_project: satdifuser\nnum_workers: 4\nlimited_label: 0.1\n"
        "device: cuda\nbase:\n  - _base_/diffusionsat.yaml\n  - _base_/satdifuser.yaml\n"
        "  - _base_/upernet.yaml\n  - tasks/meurosat.yaml\n"
    )
    cfg = load_config(exp)
    assert cfg.report_to == "wandb" and cfg.limited_label == 0.1 and cfg.dataset_name == "meurosat"


def test_later_files_and_overrides_win_and_replace_dicts_whole(tmp_path):
    (tmp_path / "base.yaml").write_text("dataset_name: x\nlayer_idxs:\n  up_blocks:\n    attn1: all\n    conv2: all\n")
    (tmp_path / "exp.yaml").write_text("base: [base.yaml]\nlayer_idxs:\n  up_blocks:\n    conv2: [[1, 0]]\n")
    cfg = load_config(tmp_path / "exp.yaml", {"latent": "mean"})
    assert cfg.layer_idxs == {"up_blocks": {"conv2": [[1, 0]]}}  # not merged into the base's attn1: all
    assert cfg.latent == "mean"
    over = load_config(tmp_path / "exp.yaml", {"layer_idxs": {"up_blocks": {"attn1": "all"}}})
    assert over.layer_idxs == {"up_blocks": {"attn1": "all"}}


def test_the_shipped_experiments_select_the_paper_layers_and_an_override_narrows_them():
    base = load_config("configs/eurosat_exp.yaml")
    assert base.layer_idxs == {"up_blocks": {"attn1": "all", "conv2": "all"}}
    narrowed = load_config("configs/eurosat_exp.yaml", {"layer_idxs": {"up_blocks": {"attn1": "all"}}})
    assert narrowed.layer_idxs == {"up_blocks": {"attn1": "all"}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fusr": "gw"}, "unknown key 'fusr' (value 'gw'); did you mean 'fuser'?"),
        ({"fuser": "mlp"}, "fuser is 'mlp'; expected one of gw, lw, moe"),
        ({"save_timesteps": [47, "x"]}, "save_timesteps is [47, 'x']; expected a non-empty list of distinct integers >= 0"),
        ({"save_timesteps": [47, 47]}, "expected a non-empty list of distinct integers"),
        ({"device": "gpu"}, "device is 'gpu'; expected auto, cpu, cuda, cuda:N or mps"),
        ({"metadata": [1, 2000]}, "expected a list of numbers in [0, 1000]"),
        ({"projection_dim": 100}, "projection_dim 100 is not a multiple of 128"),
        ({"save_timesteps": [50]}, "save_timesteps [50] has labels >= num_timesteps 50"),
        ({"latent": "mode"}, "latent is 'mode'; expected one of sample, mean"),
        ({"layer_idxs": {"up_blocks": {"attn1": "some"}}}, "expected a mapping like {up_blocks:"),
        ({"img_size": 100}, "img_size 100 is not a multiple of 8"),
        ({"use_metadata": True}, "use_metadata is true but num_metadata is 0"),
        ({"batch_size": 0}, "batch_size is 0; expected an integer >= 1"),
        ({"lw_input": "ref"}, "lw_input is 'ref'; expected one of paper, reference"),
        ({"limited_label": 0}, "limited_label is 0; expected a number in (0, 1]"),
        ({"limited_label": 1.5}, "limited_label is 1.5; expected a number in (0, 1]"),
        ({"rescales": [3, 1, 1, 1]},
         "rescales is [3, 1, 1, 1]; expected a non-empty list of factors from 4, 2, 1, 0.5, 0.25"),
        ({"rescales": []}, "rescales is []; expected a non-empty list of factors"),
        ({"rescales": [2, 1, 1, 1]}, "rescales [2, 1, 1, 1] only applies to the UPerNet head of segmentation tasks "
                                     "and task is classification; set rescales: [1, 1, 1, 1]"),
        ({"negative_prompt": "blurry"}, "negative_prompt 'blurry' has no effect on feature extraction"),
        ({"resize_outputs": 64}, "resize_outputs is 64; only values <= 0 (maps kept at their sizes) work"),
        ({"band_scale": -1}, "band_scale is -1; expected a number > 0"),
        ({"band_scale": 0}, "band_scale is 0; expected a number > 0"),
    ],
)
def test_bad_values_are_refused_with_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/eurosat_exp.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_error_names_the_file_that_set_the_key(tmp_path):
    (tmp_path / "exp.yaml").write_text("dataset_name: x\nnum_timesteps: -3\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: num_timesteps is -3; expected an integer >= 1"):
        load_config(tmp_path / "exp.yaml")


def test_cross_key_errors_name_the_file_that_set_the_key(tmp_path):
    (tmp_path / "task.yaml").write_text("dataset_name: x\nimg_size: 100\n")
    (tmp_path / "exp.yaml").write_text("base: [task.yaml]\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"task.yaml: img_size 100 is not a multiple of 8"):
        load_config(tmp_path / "exp.yaml")


def test_missing_files_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "exp.yaml").write_text("base: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "exp.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(tmp_path / "bad.yaml")


def test_reference_keys_at_their_working_values_are_accepted():
    cfg = load_config("configs/chesa_exp.yaml", {"rescales": [4, 2, 1, 0.5], "limited_label": 1, "resize_outputs": 0,
                                                 "negative_prompt": "", "lw_input": "reference"})
    assert cfg.rescales == [4, 2, 1, 0.5] and cfg.limited_label == 1 and cfg.lw_input == "reference"
    assert load_config("configs/eurosat_exp.yaml").lw_input == "paper"


@pytest.mark.parametrize("key, value, message", [
    ("negative_prompt", "'clouds'", "negative_prompt 'clouds' has no effect on feature extraction"),
    ("resize_outputs", "32", "resize_outputs is 32; only values <= 0"),
])
def test_refused_reference_keys_name_the_task_file_that_set_them(tmp_path, key, value, message):
    (tmp_path / "task.yaml").write_text(f"dataset_name: x\n{key}: {value}\n")
    (tmp_path / "exp.yaml").write_text("base: [task.yaml]\nlr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "exp.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'task.yaml'}: {message}") and "\n" not in str(err.value)
