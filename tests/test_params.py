import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.params import check_declared_output, read_params, report_out, section, task_entries

ENTRY = {"config": "demo_cls", "dataset": "demo-landcover", "geobench": "classification_v1.0/demo-landcover"}


def test_a_section_is_its_mapping_and_an_absent_one_is_empty(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"fit": {"seeds": [1, 2], "overrides": {"lr": 0.1}}}))
    assert section(path, "fit") == {"seeds": [1, 2], "overrides": {"lr": 0.1}}
    assert section(path, "probe") == {}
    path.write_text("")
    assert read_params(path) == {}


@pytest.mark.parametrize("values, message", [
    ({"out": 3}, "{path} report.out: expected a folder name, found 3"),
    ({"out": ""}, "{path} report.out: expected a folder name, found ''"),
])
def test_the_report_folder_must_be_a_name(tmp_path, values, message):
    with pytest.raises(ConfigError) as err:
        report_out(tmp_path / "params.yaml", values)
    assert str(err.value) == message.format(path=tmp_path / "params.yaml")
    assert report_out("params.yaml", {}) == "reports"


def test_a_mapping_key_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"report": {"leaderboard": "leaderboard"}}))
    with pytest.raises(ConfigError) as err:
        section(path, "report")
    assert str(err.value) == f"{path} report.leaderboard: expected a mapping, found 'leaderboard'"


def test_task_entries_are_matched_by_their_config_path():
    data = {"tasks": [ENTRY, {**ENTRY, "config": "demo_seg"}, "not a mapping"]}
    assert task_entries("configs/demo_cls_exp.yaml", data) == [ENTRY]
    assert task_entries("./configs/demo_cls_exp.yaml", data) == [ENTRY]
    assert task_entries("configs/other_exp.yaml", data) == []


def test_a_cache_dir_that_moves_the_declared_output_is_refused(tmp_path, monkeypatch):
    import shutil

    shutil.copytree("configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    config = "configs/demo_cls_exp.yaml"
    check_declared_output(config, load_config(config), "val", {"tasks": [ENTRY]})  # cache/demo-landcover/val.zarr
    cfg = load_config(config, {"cache_dir": "elsewhere"})
    with pytest.raises(ConfigError) as err:
        check_declared_output(config, cfg, "val", {"tasks": [ENTRY]})
    assert str(err.value) == (f"{config}: cache_dir 'elsewhere' puts the cache at elsewhere/demo-landcover/val.zarr, "
                              f"but dvc.yaml declares cache/demo-landcover/val.zarr (params.yaml tasks entry {ENTRY}); "
                              "leave cache_dir at 'cache' under DVC")
