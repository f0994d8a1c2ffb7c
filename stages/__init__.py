"""One module per DVC stage: each reads its params.yaml section and calls one library function."""

import os
from pathlib import Path

import yaml


def params(section: str, path: str | Path = "params.yaml") -> dict:
    """The stage's section of params.yaml (empty when absent)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return dict(data.get(section) or {})


def task_entries(config: str | Path, path: str | Path = "params.yaml") -> list[dict]:
    """The params.yaml ``tasks`` entries whose ``config`` is this experiment file
    (``configs/<config>_exp.yaml``, as dvc.yaml builds the path)."""
    tasks = (yaml.safe_load(Path(path).read_text()) or {}).get("tasks") or []
    target = os.path.normpath(config)
    return [t for t in tasks if isinstance(t, dict) and os.path.normpath(f"configs/{t.get('config')}_exp.yaml") == target]


def run(main) -> None:
    """Run a stage's ``main``; an error the user can fix is one line on stderr and exit status 2."""
    import sys

    from pipeline.errors import UserError

    try:
        main()
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
