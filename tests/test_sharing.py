"""Sharing caches through a DVC remote: one clone extracts and pushes, a second pulls and goes
straight to fitting. Runs the real `satdifuser` commands in a small DVC project made here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def make_project(root: Path, demo_root, tiny_backbone) -> None:
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "exp.yaml").write_text(yaml.safe_dump({
        "base": ["configs/demo_cls_exp.yaml"], "geobench_dir": str(demo_root),
        "pretrained_model_name_or_path": str(tiny_backbone.root), "img_size": 64, "cache_dir": "cache",
        "shard_size": 8, "num_workers": 0, "projection_dim": 128, "batch_size": 8, "max_train_epochs": 1,
    }))
    (root / "params.yaml").write_text(yaml.safe_dump({"extract": {"device": "cpu", "overrides": {}},
                                                      "fit": {"device": "cpu", "overrides": {}}}))
    splits = ["train", "val", "test"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "extract": {"matrix": {"split": splits}, "cmd": "satdifuser extract exp.yaml --split ${item.split} --params params.yaml",
                    "deps": ["exp.yaml"], "params": ["extract"],
                    "outs": [{"cache/demo-landcover/${item.split}.zarr": {"persist": True}}]},
        "fit": {"cmd": "satdifuser fit exp.yaml --fuser gw --out out/gw --scores out/gw-scores.json --params params.yaml",
                "deps": ["exp.yaml"] + [f"cache/demo-landcover/{s}.zarr" for s in splits], "params": ["fit"],
                "outs": [{"out/gw": {"persist": True}}], "metrics": [{"out/gw-scores.json": {"cache": False}}]},
    }}, sort_keys=False))


def test_pulled_caches_skip_extraction(tmp_path, demo_root, tiny_backbone):
    first, second, remote = tmp_path / "lab-a", tmp_path / "lab-b", tmp_path / "remote"
    first.mkdir()
    make_project(first, demo_root, tiny_backbone)
    run(["git", "init", "-q", "-b", "main"], first)
    run([DVC, "init", "-q"], first)
    run([DVC, "config", "core.analytics", "false"], first)
    run([DVC, "remote", "add", "-d", "shared", str(remote)], first)
    out = run([DVC, "repro"], first)
    assert out.count("Running stage 'extract@") == 3 and "Running stage 'fit'" in out
    run(["git", "add", "-A"], first)
    run(["git", "commit", "-qm", "extract and fit"], first)
    run([DVC, "push"], first)

    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    run([DVC, "pull"], second)
    assert "up to date" in run([DVC, "status"], second)
    for split in ("train", "val", "test"):  # the pulled caches are whole and identical
        verify = subprocess.run([sys.executable, str(REPO / "cli.py"), "cache", "verify",
                                 str(second / "cache" / "demo-landcover" / f"{split}.zarr")], capture_output=True, text=True)
        assert verify.returncode == 0 and verify.stdout.strip().endswith(": ok"), verify.stdout + verify.stderr

    params = yaml.safe_load((second / "params.yaml").read_text())
    params["fit"]["overrides"] = {"lr": 0.001}
    (second / "params.yaml").write_text(yaml.safe_dump(params))
    status = run([DVC, "status"], second)
    assert "fit:" in status and "extract@" not in status
    out = run([DVC, "repro"], second)
    assert "Running stage 'fit'" in out and "Running stage 'extract" not in out
    assert out.count("didn't change, skipping") == 3
    metrics = json.loads((second / "out" / "gw" / "default" / "seed42" / "metrics.json").read_text())
    assert metrics["unet_passes"] == 0 and metrics["reference_unet_passes"] > 0
