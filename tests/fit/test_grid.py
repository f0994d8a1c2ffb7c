import json

import pytest

from pipeline.config import ConfigError
from pipeline.fit.grid import check_grid, done_score, run_dir


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


@pytest.mark.parametrize("partitions, seeds, message", [
    ([], [1], r"params.yaml fit.partitions is \[\]; expected a non-empty list of GEO-Bench partition names"),
    ("default", [1], r"fit.partitions is 'default'; expected a non-empty list"),
    (["default"], [1, "2"], r"params.yaml fit.seeds is \[1, '2'\]; expected a non-empty list of integers >= 0"),
    (["default", "default"], [1], r"fit.partitions is \['default', 'default'\]; name each one once"),
])
def test_a_bad_grid_is_refused_in_one_line(partitions, seeds, message):
    with pytest.raises(ConfigError, match=message):
        check_grid(partitions, seeds)
