"""Extraction by torchrun ranks (gloo on the CPU) into one store, against a one-process extraction."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pipeline.cache.reader import open_cache
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.extract.distributed import Ranks, rank_device, setting_differences, shared_devices, strip_nproc
from pipeline.extract.run import Extraction
from tests.zarr_arrays import all_arrays

ROOT = pathlib.Path(__file__).resolve().parents[2]
ATTN1 = {"up_blocks": {"attn1": "all"}}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Rank 1 writes its first shard (marked done), then dies by SIGKILL as it starts its second.
KILL_RANK_1 = """
import os, signal, sys
from pipeline.cache.writer import CacheWriter
if os.environ["RANK"] == "1":
    write, written = CacheWriter.write_shard, []
    def write_or_die(self, shard, *args, **kwargs):
        if written:
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, shard, *args, **kwargs)
        written.append(shard)
    CacheWriter.write_shard = write_or_die
import cli
sys.exit(cli.main())
"""


@pytest.fixture
def exp(tmp_path, demo_root, tiny_backbone):
    """``exp(shard_size)``: an experiment file of the tiny classification task (attn1 layers only)."""

    def write(shard_size: int, **overrides) -> pathlib.Path:
        path = tmp_path / f"exp{shard_size}.yaml"
        path.write_text(yaml.safe_dump({
            "base": [str(ROOT / "configs/demo_cls_exp.yaml")], "geobench_dir": str(demo_root),
            "pretrained_model_name_or_path": str(tiny_backbone.root), "img_size": 64, "layer_idxs": ATTN1,
            "cache_dir": str(tmp_path / "cache"), "shard_size": shard_size, "extract_batch_size": 4,
            "num_workers": 0, "device": "cpu", **overrides,
        }))
        return path

    return write


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run(args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=300)


def reference(exp_file: pathlib.Path, split: str, tmp_path) -> str:
    """The split extracted by one process, beside the cache under test, with one thread as each of
    two ranks on two cores has (CPU kernels round float32 by their thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Extraction(load_config(exp_file)).run(split, path=str(tmp_path / f"one-{split}.zarr"), progress=False).path
    finally:
        torch.set_num_threads(threads)


def assert_same_store(expected: str, got: str) -> None:
    a, b = all_arrays(expected), all_arrays(got)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    ledger_a, ledger_b = open_cache(expected).attrs["ledger"], open_cache(got).attrs["ledger"]
    for key in ("unet_passes", "vae_passes", "images_extracted", "bytes_stored"):
        assert ledger_a[key] == ledger_b[key], key


def test_two_ranks_write_the_store_one_process_writes(exp, tmp_path):
    exp_file = exp(8)  # train: 3 shards (rank 0 writes two); val and test: one, so rank 1 is idle
    done = run([*TORCHRUN, "-m", "cli", "extract", str(exp_file), "--split", "all", "--no-progress"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{tmp_path}/cache/demo-landcover/train.zarr: 20 samples, "
                                                   "20 extracted by 2 ranks, ")
    assert "8 samples, 8 extracted by 2 ranks" in lines[1]
    for split in ("train", "val", "test"):
        assert_same_store(reference(exp_file, split, tmp_path), f"{tmp_path}/cache/demo-landcover/{split}.zarr")
    # Rank 0 refuses the store built with other settings; the other rank stops without repeating it.
    refused = run([sys.executable, "-m", "cli", "extract", str(exp_file), "--nproc", "2", "--no-progress",
                   "--set", "prompt=other"])
    assert refused.returncode == 2 and refused.stdout == ""
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cache {tmp_path}/cache/demo-landcover/train.zarr was "
                                                     "built with other settings (extraction.prompt: ")


def test_a_killed_rank_loses_only_its_unfinished_shard_and_one_process_finishes(exp, tmp_path):
    exp_file = exp(4)  # train: 5 shards, rank 0 writes 0, 2, 4 and rank 1 writes 1, 3
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    killed = run([*TORCHRUN, str(script), "extract", str(exp_file), "--split", "train", "--no-progress"])
    assert killed.returncode != 0
    path = f"{tmp_path}/cache/demo-landcover/train.zarr"
    done = open_cache(path).done.reshape(5, 4).all(axis=1)
    assert done[1] and not done[3]  # rank 1's first shard kept, its second never marked
    expected = reference(exp_file, "train", tmp_path)
    np.testing.assert_array_equal(all_arrays(path)["features/t47/up_blocks_1_attn1_0"][4:8],
                                  all_arrays(expected)["features/t47/up_blocks_1_attn1_0"][4:8])
    resumed = run([sys.executable, "-m", "cli", "extract", str(exp_file), "--split", "train", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    left = 20 - 4 * int(done.sum())
    assert f"20 samples, {left} extracted" in resumed.stdout
    np.testing.assert_array_equal(open_cache(path).done, True)
    a, b = all_arrays(expected), all_arrays(path)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_with_other_settings_is_refused_before_anything_is_written(exp, tmp_path):
    exp_file, port = exp(8), str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "cli", "extract", str(exp_file), "--split", "val",
                               "--no-progress", "--set", f"prompt={prompt}"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port))
             for rank, prompt in enumerate(["A satellite image", "A satellite image of farms"])]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert outs[0][1].strip().splitlines()[-1] == (
        "error: the ranks were started with other settings than rank 0 (extraction.prompt: rank 0 'A satellite "
        "image', rank 1 'A satellite image of farms'); start every rank with the same config, --set values, "
        "backbone files and data")
    assert "error:" not in outs[1][1]  # rank 0 said it
    assert not (tmp_path / "cache").exists()


def test_ranks_come_from_the_launchers_environment():
    assert Ranks.from_env({}) is None and Ranks.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    ranks = Ranks.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert ranks == Ranks(3, 4, 1, 2) and not ranks.leader
    assert ranks.share([0, 1, 2, 3, 5, 7, 8, 9]) == [3, 9]
    assert Ranks(5, 8, 5, 8).share([0, 1, 2]) == []  # more ranks than shards: an idle rank
    with pytest.raises(UserError, match=r"WORLD_SIZE is 2 but RANK is not set"):
        Ranks.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match=r"LOCAL_RANK='x' is not a whole number"):
        Ranks.from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"})


def test_a_rank_runs_on_the_gpu_of_its_local_rank():
    ranks = Ranks(5, 8, 1, 4)
    assert rank_device("auto", ranks, 4) == "cuda:1" and rank_device("cuda", ranks, 4) == "cuda:1"
    assert rank_device("cuda", ranks, 1) == "cuda:0"  # one visible GPU per rank (srun --gpus-per-task)
    assert rank_device("auto", ranks, 0) == "cpu" and rank_device("cuda:3", ranks, 4) == "cuda:3"


def test_two_ranks_on_one_gpu_are_named():
    assert shared_devices([None, None]) == []
    assert shared_devices(["a/GPU-1", "a/GPU-2", "a/GPU-1", "b/GPU-1"]) == ["ranks 0, 2 share the GPU a/GPU-1"]


def test_settings_differences_name_the_rank_and_both_values():
    same = {"extraction": {"seed": 0}, "cache": "c.zarr"}
    assert setting_differences([same, same]) == []
    assert setting_differences([same, same, {"extraction": {"seed": 1}, "cache": "c.zarr"}]) == [
        "extraction.seed: rank 0 0, rank 2 1"]


def test_nproc_is_not_passed_to_the_ranks():
    assert strip_nproc(["extract", "c.yaml", "--nproc", "2", "--split", "all"]) == ["extract", "c.yaml", "--split", "all"]
    assert strip_nproc(["extract", "--nproc=2", "c.yaml"]) == ["extract", "c.yaml"]


def test_nproc_under_torchrun_is_refused(exp):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["extract", str(exp(8)), "--nproc", "2"], env={"WORLD_SIZE": "2", "RANK": "1"})
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --nproc 2 launches torchrun itself, but this process is already rank 1 of "
                                     "2; leave --nproc out under torchrun")

