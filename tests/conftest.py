import atexit
import os
import shutil
import tempfile

# Set before any test module imports transformers, diffusers or geobench.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("GEO_BENCH_DIR"):
    os.environ["GEO_BENCH_DIR"] = tempfile.mkdtemp(prefix="geobench-")
    atexit.register(shutil.rmtree, os.environ["GEO_BENCH_DIR"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A tiny random DiffusionSat at 64 px (with metadata weights), loaded without metadata."""
    from pipeline.backbone.demo import build_demo_backbone
    from pipeline.backbone.loader import BackboneSpec

    root = tmp_path_factory.mktemp("diffusionsat")
    build_demo_backbone(root, img_size=64)
    return BackboneSpec(root, img_size=64, use_metadata=False)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A GEO-Bench root with a 6 x 6-patch corner of the demo scene (both tasks, 20/8/8 split)."""
    from pipeline.data.demo import build_demo_tasks

    root = tmp_path_factory.mktemp("geobench")
    build_demo_tasks(root, block_patches=2, max_grid=(6, 6))
    return root


@pytest.fixture
def make_config(demo_root, tiny_backbone, tmp_path):
    """Build a demo experiment config that points at the tiny task, backbone and a tmp cache."""
    from pipeline.config import load_config

    def make(exp: str = "demo_cls", **overrides):
        values = {
            "geobench_dir": str(demo_root), "pretrained_model_name_or_path": str(tiny_backbone.root),
            "img_size": 64, "cache_dir": str(tmp_path / "cache"), "shard_size": 4,
            "extract_batch_size": 3, "num_workers": 0, "device": "cpu",
        }
        values.update(overrides)
        return load_config(f"configs/{exp}_exp.yaml", values)

    return make


@pytest.fixture(scope="session")
def multilabel_root(tmp_path_factory):
    """A multi-label GEO-Bench task (5 classes, 16 x 16 px, 6 train / 2 valid / 2 test samples)
    written with geobench's own writer; returns the root and each sample's label vector."""
    import geobench as gb
    import numpy as np

    root = tmp_path_factory.mktemp("geobench-ml")
    task_dir = root / "classification_v1.0" / "toy-multilabel"
    task_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    partition, labels = gb.Partition(), {}
    for i, split in enumerate(["train"] * 6 + ["valid"] * 2 + ["test"] * 2):
        name = f"s{i}"
        bands = [gb.Band(rng.integers(0, 4000, (16, 16)).astype(np.int16), info, 10) for info in gb.sentinel2_13_bands[1:4]]
        labels[name] = rng.integers(0, 2, 5).astype(np.uint8)
        gb.Sample(bands, labels[name], name).write(str(task_dir))
        partition.add(split, name)
    gb.TaskSpecifications(dataset_name="toy-multilabel", benchmark_name="classification_v1.0", patch_size=(16, 16),
                          spatial_resolution=10, bands_info=gb.sentinel2_13_bands[1:4],
                          label_type=gb.MultiLabelClassification(5)).save(str(task_dir))
    partition.save(str(task_dir), "default")
    return root, labels


@pytest.fixture(scope="session")
def cached_demo(demo_root, tiny_backbone, tmp_path_factory):
    """Caches of every split of both tiny demo tasks (extracted once), and a config maker for fits."""
    from pipeline.config import load_config
    from pipeline.extract.run import Extraction

    cache_dir = tmp_path_factory.mktemp("cache")
    base = {
        "geobench_dir": str(demo_root), "pretrained_model_name_or_path": str(tiny_backbone.root),
        "img_size": 64, "cache_dir": str(cache_dir), "shard_size": 8, "num_workers": 0, "device": "cpu",
        "projection_dim": 128, "channels": 32, "batch_size": 8, "val_batch_size": 8, "max_train_epochs": 2,
        "moe_warmup_steps": 2,
    }

    def make(exp: str = "demo_cls", **overrides):
        return load_config(f"configs/{exp}_exp.yaml", {**base, **overrides})

    for exp in ("demo_cls", "demo_seg"):
        extraction = Extraction(make(exp))
        for split in ("train", "val", "test"):
            extraction.run(split, progress=False)
    return make


@pytest.fixture
def read_only():
    """``with read_only(folder):`` makes a folder read-only for this process, as read-only media
    would: by permissions for a normal user, by a read-only bind mount for root (whom permission
    bits do not stop)."""
    import contextlib
    import subprocess

    @contextlib.contextmanager
    def make(folder):
        folder = str(folder)
        if os.geteuid() != 0:
            subprocess.run(["chmod", "-R", "a-w", folder], check=True)
            try:
                yield
            finally:
                subprocess.run(["chmod", "-R", "u+w", folder], check=True)
            return
        mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", folder, folder],
                                         capture_output=True).returncode:
            if mounted:
                subprocess.run(["umount", folder])
            pytest.skip("cannot make a read-only folder here: not allowed to mount, and root ignores permissions")
        try:
            yield
        finally:
            subprocess.run(["umount", folder], check=True)

    return make


@pytest.fixture
def write_exp(tmp_path, demo_root, tiny_backbone):
    """``write_exp(**overrides)`` writes an experiment file for the tiny demo classification task,
    as a user would, and returns its path."""
    import pathlib

    import yaml

    def write(name: str = "exp.yaml", **overrides) -> pathlib.Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({
            "base": [str(pathlib.Path("configs/demo_cls_exp.yaml").resolve())],
            "geobench_dir": str(demo_root), "pretrained_model_name_or_path": str(tiny_backbone.root),
            "img_size": 64, "cache_dir": str(tmp_path / "cache"), "shard_size": 4, "num_workers": 0,
            "device": "cpu", **overrides,
        }))
        return path

    return write
