import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.fit.grid import check_grid, done_score, run_dir
from pipeline.fit.run import FIT_CODE, code_digest

REPO = Path(__file__).resolve().parents[2]


def test_the_fit_stage_depends_on_the_code_whose_digest_decides_a_run_and_on_its_own_params_only():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["fit"]
    code = {d for d in stage["deps"] if d.startswith("pipeline/")}
    # grid.py skips runs and params.py reads the section: they decide nothing of a run
    assert code - set(FIT_CODE) == {"pipeline/fit/grid.py", "pipeline/params.py"} and set(FIT_CODE) <= code
    assert {"cli.py", "pipeline/params.py"} <= set(stage["deps"]) and not any("stages" in d for d in stage["deps"])
    assert stage["params"] == ["fit.partitions", "fit.seeds", "fit.overrides", "fit.device"]
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["fit"]
    assert (defaults["partitions"], defaults["seeds"]) == (["default"], [42])  # the demo's repro stays one run per stage


def test_a_run_is_done_only_with_both_files_whole_and_the_same_inputs(tmp_path):
    out = run_dir(tmp_path, "0.10x_train", 3)
    assert out == tmp_path / "0.10x_train" / "seed3" and done_score(out, "abc") is None
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"inputs_sha256": "abc"}))
    assert done_score(out, "abc") is None  # no metrics.json: the fit did not finish
    (out / "metrics.json").write_text(json.dumps({"test_score": 0.5}))
    assert done_score(out, "abc") == 0.5 and done_score(out, "other") is None
    (out / "run.json").write_text('{"inputs_sha256": "ab')  # cut short
    assert done_score(out, "abc") is None


def test_the_code_digest_changes_with_a_file_it_covers(tmp_path, monkeypatch):
    import pipeline.fit.run as fit_module

    first = code_digest()
    assert first == code_digest()
    for entry in FIT_CODE:
        src = REPO / entry
        dst = tmp_path / entry
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.write_bytes(src.read_bytes())
    monkeypatch.setattr(fit_module, "__file__", str(tmp_path / "pipeline" / "fit" / "run.py"))
    assert code_digest() == first
    loop = tmp_path / "pipeline" / "fit" / "loop.py"
    loop.write_text(loop.read_text() + "\n# changed\n")
    assert code_digest() != first


@pytest.mark.parametrize("partitions, seeds, message", [
    ([], [1], r"params.yaml fit.partitions is \[\]; expected a non-empty list of GEO-Bench partition names"),
    ("default", [1], r"fit.partitions is 'default'; expected a non-empty list"),
    (["default"], [1, "2"], r"params.yaml fit.seeds is \[1, '2'\]; expected a non-empty list of integers >= 0"),
    (["default", "default"], [1], r"fit.partitions is \['default', 'default'\]; name each one once"),
])
def test_a_bad_grid_is_refused_in_one_line(partitions, seeds, message):
    with pytest.raises(ConfigError, match=message):
        check_grid(partitions, seeds)
