import os

import pytest

from pipeline.errors import UserError
from pipeline.outputs import begin_output, output_folder, partial_path, publish_output


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_file_in_the_way_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--out .*file is an existing file; an output is a folder: choose another --out"):
        output_folder(tmp_path / "file")
    with pytest.raises(UserError, match=r"would be inside .*file, which is a file"):
        output_folder(tmp_path / "file" / "run")
    assert output_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run"


def test_publish_replaces_the_output_whole_and_keeps_what_the_run_does_not_write(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights").write_text("old")
    (out / "metrics.json").write_text("old")
    (out / ".gitignore").write_text("/model\n")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("mine")
    partial = begin_output(out)
    assert partial == tmp_path / ".run.partial" and partial.is_dir()
    (partial / "model").mkdir()
    (partial / "model" / "weights").write_text("new")
    (partial / "metrics.json").write_text("new")
    assert tree(out)["metrics.json"] == b"old"  # nothing changes before the swap
    publish_output(partial, out)
    assert tree(out) == {".gitignore": b"/model\n", "metrics.json": b"new", "model/weights": b"new", "notes/a.txt": b"mine"}
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_stale_partial_folder_is_cleared_except_the_file_kept(tmp_path):
    out = tmp_path / "run"
    stale = partial_path(out)
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "weights").write_text("stale")
    (stale / "state").write_text("state")
    assert os.listdir(begin_output(out, keep=stale / "state")) == ["state"]
    assert os.listdir(begin_output(out)) == []


def test_a_swap_stopped_between_its_renames_is_undone_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "metrics.json").write_text("old")
    partial = begin_output(out)
    (partial / "metrics.json").write_text("new")
    os.rename(out, tmp_path / ".run.old")  # the first rename of publish_output, then a kill
    begin_output(out)
    assert tree(out) == {"metrics.json": b"old"} and not (tmp_path / ".run.old").exists()
