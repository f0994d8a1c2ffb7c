"""One module per DVC stage: each reads its params.yaml section and calls one library function."""

from pathlib import Path

import yaml


def params(section: str, path: str | Path = "params.yaml") -> dict:
    """The stage's section of params.yaml (empty when absent)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return dict(data.get(section) or {})
