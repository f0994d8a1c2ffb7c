"""One module per DVC stage: each reads its params.yaml section and calls one library function."""

from pathlib import Path

import yaml


def params(section: str, path: str | Path = "params.yaml") -> dict:
    """The stage's section of params.yaml (empty when absent)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return dict(data.get(section) or {})


def run(main) -> None:
    """Run a stage's ``main``; an error the user can fix is one line on stderr and exit status 2."""
    import sys

    from pipeline.errors import UserError

    try:
        main()
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
