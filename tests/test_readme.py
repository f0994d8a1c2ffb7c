"""The README's Python snippets run as written, on a cache laid out as the demo's."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_python_snippets_run(cached_demo, tmp_path, monkeypatch):
    snippets = python_snippets()
    assert snippets, "the README has no Python snippet"
    (tmp_path / "cache").symlink_to(cached_demo().cache_dir)  # cache/demo-landcover/{train,val,test}.zarr
    monkeypatch.chdir(tmp_path)
    for code in snippets:  # a snippet that raises fails the test
        exec(compile(code, str(README), "exec"), {})
