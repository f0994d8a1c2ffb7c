"""Stage demo_data: cut the Sentinel-2 demo scene into GEO-Bench tasks."""

from pathlib import Path

from pipeline.data.demo import build_demo_tasks
from stages import params, run


def main() -> None:
    p = params("demo_data")
    build_demo_tasks(Path(p.pop("root")), overwrite=True, **p)


if __name__ == "__main__":
    run(main)
