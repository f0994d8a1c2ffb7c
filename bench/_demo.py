"""The demo task and backbone for benchmarks: the pipeline's own when `make demo` has run, else
built once into a temporary folder (about 20 s)."""

from __future__ import annotations

import tempfile
from pathlib import Path

DATA, BACKBONE = Path("data/geobench"), Path("models/demo-diffusionsat")


def demo_paths(img_size: int = 128) -> dict:
    """Config overrides that point a demo experiment at a usable task and backbone."""
    if (DATA / "classification_v1.0" / "demo-landcover").is_dir() and (BACKBONE / "model_index.json").is_file():
        return {"geobench_dir": str(DATA), "pretrained_model_name_or_path": str(BACKBONE)}
    from pipeline.backbone.demo import build_demo_backbone
    from pipeline.data.demo import build_demo_tasks

    root = Path(tempfile.mkdtemp(prefix="satdifuser-bench-"))
    build_demo_tasks(root / "geobench")
    build_demo_backbone(root / "backbone", img_size=img_size)
    return {"geobench_dir": str(root / "geobench"), "pretrained_model_name_or_path": str(root / "backbone")}
