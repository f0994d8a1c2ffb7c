"""Stage demo_backbone: write a tiny random DiffusionSat in the published checkpoint layout."""

from pathlib import Path

from pipeline.backbone.demo import build_demo_backbone
from stages import params, run


def main() -> None:
    p = params("demo_backbone")
    build_demo_backbone(Path(p.pop("root")), overwrite=True, **p)


if __name__ == "__main__":
    run(main)
