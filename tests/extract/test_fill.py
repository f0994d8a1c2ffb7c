import csv
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.cache.audit import cache_info, map_errors, verify_cache
from pipeline.cache.layout import ATTRS_KEY
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError, CacheMismatch
from pipeline.cache.writer import FILL_DONE, FILL_KEY, CacheWriter
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.extract.run import Extraction
from tests.zarr_arrays import all_arrays

FEW = {"up_blocks": {"attn1": [[1, 0]], "conv2": [[3, 2]]}}  # two layers keep these tests quick


def assert_same_arrays(direct: str, filled: str) -> None:
    """A filled cache holds what a direct extraction does: the same arrays, maps within float16 rounding
    (kernels round by memory layout, see pipeline.extract.fill) widened for lossy maps by their recorded error,
    pooled vectors within float32 rounding, everything else bit for bit."""
    a, b = all_arrays(direct), all_arrays(filled)
    assert sorted(a) == sorted(b)
    want, got = open_cache(direct), open_cache(filled)
    errors = map_errors(want).get("per_layer", {})
    for t in want.timesteps:
        for layer in want.layers:
            slack = 2 * errors[f"{t}/{layer}"]["max_abs"] if errors else 0.0
            if "maps" in want.tiers:
                torch.testing.assert_close(got.features(range(len(got)), [t], [layer])[t][layer],
                                           want.features(range(len(want)), [t], [layer])[t][layer],
                                           rtol=2**-10, atol=1e-5 + slack)
            if "pooled" in want.tiers:
                np.testing.assert_allclose(b[f"pooled/{t}/{layer}"], a[f"pooled/{t}/{layer}"], rtol=1e-5, atol=1e-6)
    for name in a:
        if not name.startswith(("features/", "feature_scales/", "pooled/")):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def assert_same_errors(direct: str, filled: str) -> None:
    """Error sums recorded the same way: every image once, nearly the same error."""
    want, got = map_errors(open_cache(direct)), map_errors(open_cache(filled))
    assert sorted(got.get("per_layer", {})) == sorted(want.get("per_layer", {}))
    for key, error in want.get("per_layer", {}).items():
        assert got["per_layer"][key]["images"] == error["images"]
        assert got["per_layer"][key]["rel_l2"] == pytest.approx(error["rel_l2"], rel=0.05)


def trajectory_and_direct(make_config, tmp_path, split="val", **overrides):
    """A trajectory-only cache of ``split`` at the config's path and a direct extraction of every tier."""
    direct = Extraction(make_config(**overrides)).run(split, path=str(tmp_path / "direct.zarr"), progress=False)
    extraction = Extraction(make_config(store=["trajectory"], **overrides))
    extraction.run(split, progress=False)
    return extraction, direct.path


@pytest.mark.parametrize("encoding", ["float16", "uint8"])
def test_filled_maps_and_pooled_vectors_are_those_of_a_direct_extraction(make_config, tmp_path, monkeypatch, encoding):
    from pipeline.extract.extractor import FeatureExtractor

    extraction, direct = trajectory_and_direct(make_config, tmp_path, map_encoding=encoding)
    path = extraction.cfg.cache_path("val")
    before = dict(open_cache(path).attrs["ledger"])
    passes = []
    original = FeatureExtractor._stopped_pass
    monkeypatch.setattr(FeatureExtractor, "_stopped_pass",
                        lambda self, x, t, layers: passes.append(len(x)) or original(self, x, t, layers))
    result = extraction.fill_from_trajectory("val", tiers=["maps", "pooled"], progress=False)
    assert (result.added, result.filled, result.unet_passes, result.vae_passes) == (("maps", "pooled"), 8, 24, 0)
    assert sum(passes) == 24  # 8 images x 3 labels, one pass each
    filled = open_cache(path)
    assert filled.tiers == ("maps", "pooled", "trajectory") and filled.map_encoding == encoding
    # Same batches through the same UNet, written by the same writer.
    assert_same_arrays(direct, path)
    assert_same_errors(direct, path)
    assert FILL_KEY not in filled.attrs and FILL_DONE not in zarr.open_group(path, mode="r")
    assert verify_cache(filled) == []
    ledger = filled.attrs["ledger"]
    assert ledger["unet_passes"] == before["unet_passes"] + 24 and ledger["vae_passes"] == before["vae_passes"]
    assert ledger["images_filled"] == 8
    assert ledger["bytes_stored"] == cache_info(filled)["bytes_on_disk"]


def test_maps_added_to_a_trajectory_only_cache_take_the_configs_encoding(make_config, tmp_path):
    # A shared trajectory cache, extracted exact; its user stores the maps as uint8.
    direct = Extraction(make_config(layer_idxs=FEW, map_encoding="uint8", store=["maps", "trajectory"]))
    direct_path = direct.run("val", path=str(tmp_path / "direct.zarr"), progress=False).path
    path = Extraction(make_config(layer_idxs=FEW, store=["trajectory"])).run("val", progress=False).path
    user = Extraction(make_config(layer_idxs=FEW, map_encoding="uint8", store=["maps", "trajectory"]))
    assert user.fill_from_trajectory("val", tiers=["maps"], progress=False).added == ("maps",)
    filled = open_cache(path)
    assert filled.map_encoding == "uint8" and filled.tiers == ("maps", "trajectory")
    assert filled.request["extraction"] == open_cache(direct_path).request["extraction"]
    assert_same_arrays(direct_path, path)
    assert_same_errors(direct_path, path)
    # The filled cache answers the user's config as its own extraction would: nothing left to do.
    assert user.run("val", progress=False).extracted == 0
    with pytest.raises(CacheMismatch, match="map_encoding"):
        Extraction(make_config(layer_idxs=FEW, store=["maps", "trajectory"])).run("val", progress=False)
    # Once it holds maps, their encoding is part of what a fill must match.
    with pytest.raises(CacheMismatch, match=r"extraction\.map_encoding: cache 'uint8', requested 'float16'"):
        Extraction(make_config(layer_idxs=FEW)).fill_from_trajectory("val", tiers=["pooled"], progress=False)


def test_pooled_vectors_alone_are_added_to_a_cache_holding_maps(make_config, tmp_path):
    direct = Extraction(make_config(layer_idxs=FEW)).run("val", path=str(tmp_path / "direct.zarr"), progress=False)
    extraction = Extraction(make_config(layer_idxs=FEW, store=["maps", "trajectory"]))
    path = extraction.run("val", progress=False).path
    assert extraction.fill_from_trajectory("val", tiers=["pooled"], progress=False).added == ("pooled",)
    assert_same_arrays(direct.path, path)
    again = extraction.fill_from_trajectory("val", tiers=["maps", "pooled"], progress=False)
    assert (again.added, again.already, again.unet_passes) == ((), ("maps", "pooled"), 0)


KILL_AFTER_ONE_SHARD = """
import os, signal, sys
from pipeline.cache.writer import FILL_DONE, CacheWriter
from pipeline.config import load_config
from pipeline.extract.run import Extraction

write = CacheWriter.write_shard

def dying(self, *args, **kwargs):
    if self.done_array == FILL_DONE and self.done_shards():  # one shard filled: die before the next
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, *args, **kwargs)

CacheWriter.write_shard = dying
Extraction(load_config(sys.argv[1])).fill_from_trajectory("val", tiers=["maps"], progress=False)
"""


def test_a_killed_fill_holds_only_its_old_tiers_and_resumes(write_exp, tmp_path):
    exp = write_exp(layer_idxs=FEW, store=["trajectory"], map_encoding="uint8")
    direct = Extraction(load_config(exp, {"store": ["maps", "trajectory"]})).run(
        "val", path=str(tmp_path / "direct.zarr"), progress=False)
    extraction = Extraction(load_config(exp))
    path = extraction.run("val", progress=False).path
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_ONE_SHARD, str(exp)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr

    partial = open_cache(path)
    assert partial.tiers == ("trajectory",) and partial.attrs[FILL_KEY] == ["maps"]
    assert zarr.open_group(path, mode="r")[FILL_DONE][:].tolist() == [True] * 4 + [False] * 4
    with pytest.raises(CacheError, match=r"holds the tiers \['trajectory'\], not maps"):
        partial.features([0])
    assert verify_cache(partial) == [] and map_errors(partial) == {} and cache_info(partial)["tiers"] == ["trajectory"]
    with pytest.raises(CacheError) as err:
        extraction.fill_from_trajectory("val", tiers=["pooled"], progress=False)
    assert str(err.value) == (f"cache {path} has an unfinished fill of maps from its trajectory; finish it first with "
                              "`satdifuser extract CONFIG --from-trajectory --store maps`")

    resumed = extraction.fill_from_trajectory("val", progress=False)  # the unfinished fill's tiers
    assert (resumed.added, resumed.filled, resumed.unet_passes) == (("maps",), 4, 12)
    assert_same_arrays(direct.path, path)
    filled = open_cache(path)
    assert_same_errors(direct.path, path)  # each shard counted once
    assert verify_cache(filled) == []


def test_a_filled_shard_whose_files_are_gone_is_filled_again(make_config, tmp_path, monkeypatch):
    import shutil

    extraction, direct = trajectory_and_direct(make_config, tmp_path, layer_idxs=FEW)
    path = extraction.cfg.cache_path("val")
    real = CacheWriter.write_shard

    def failing(self, shard, *args, **kwargs):
        if shard == 1:
            raise OSError("disk full")
        real(self, shard, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write_shard", failing)
    with pytest.raises(OSError):
        extraction.fill_from_trajectory("val", tiers=["maps", "pooled"], progress=False)
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    assert open_cache(path).tiers == ("trajectory",)
    shutil.rmtree(f"{path}/features/t47")  # shard 0 is marked filled, its maps of one label are gone
    resumed = extraction.fill_from_trajectory("val", progress=False)
    assert resumed.filled == 8
    assert_same_arrays(direct, path)


def test_a_fit_from_filled_maps_equals_a_fit_from_extracted_maps(cached_demo, tmp_path):
    from pipeline.fit.run import fit

    cfg = cached_demo(fuser="gw", max_train_epochs=1)
    traj = cached_demo(fuser="gw", max_train_epochs=1, cache_dir=str(tmp_path / "cache"), store=["trajectory"])
    extraction = Extraction(traj)
    for split in ("train", "val", "test"):
        extraction.run(split, progress=False)
        assert extraction.fill_from_trajectory(split, tiers=["maps"], progress=False).added == ("maps",)
    direct = fit(cfg, tmp_path / "direct", progress=False)
    filled = fit(traj, tmp_path / "filled", source="maps", progress=False)
    history = lambda out: [float(row["train_loss"]) for row in csv.DictReader(open(out / "history.csv"))]  # noqa: E731
    assert history(tmp_path / "filled") == pytest.approx(history(tmp_path / "direct"), rel=1e-4)
    for split in ("val", "test"):  # as fits from maps and from the trajectory are compared
        assert set(filled[split]) == set(direct[split])
        for key, value in direct[split].items():
            np.testing.assert_allclose(np.asarray(filled[split][key], float), np.asarray(value, float), rtol=1e-3,
                                       atol=1e-4, err_msg=f"{split} {key}")


def test_the_command_a_trajectory_cache_names_fills_the_tier(write_exp):
    exp = write_exp(layer_idxs=FEW, store=["trajectory"])
    cfg = load_config(exp)
    extraction = Extraction(cfg)
    for split in ("train", "val", "test"):
        extraction.run(split, progress=False)
    with pytest.raises(CacheError) as err:
        open_cache(cfg.cache_path("val")).features([0])
    command = re.search(r"`(satdifuser [^`]*)`", str(err.value)).group(1)
    assert command == "satdifuser extract CONFIG --from-trajectory --store maps"
    argv = [str(exp) if word == "CONFIG" else word for word in shlex.split(command)[1:]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    for split in ("train", "val", "test"):
        cache = open_cache(cfg.cache_path(split))
        assert cache.tiers == ("maps", "trajectory") and verify_cache(cache) == []
        assert f"{cache.path}: {len(cache)} samples, now holds maps from the trajectory ({len(cache)} filled, " \
               f"{3 * len(cache)} UNet passes" in result.output
        assert cache.features([0])["t47"]["up_blocks_1_attn1_0"].shape[0] == 1
    again = CliRunner().invoke(app, argv + ["--split", "val"])
    assert again.exit_code == 0 and again.stdout == f"{cfg.cache_path('val')}: holds maps already; nothing to fill\n"


def fill_cli(exp, *args):
    return CliRunner().invoke(app, ["extract", str(exp), "--split", "val", "--no-progress", "--from-trajectory", *args])


def test_what_a_fill_refuses_is_one_line(write_exp, tmp_path):
    from pipeline.backbone.demo import build_demo_backbone

    exp = write_exp(layer_idxs=FEW, store=["maps", "pooled"])
    path = Extraction(load_config(exp)).run("val", progress=False).path
    result = fill_cli(exp, "--store", "maps,pooled")
    assert result.exit_code == 2 and result.output == (
        f"error: cache {path} holds the tiers ['maps', 'pooled'], not trajectory, which --from-trajectory needs; "
        "re-extract with `satdifuser extract CONFIG --overwrite --store maps,pooled`\n")
    for flag in ("--overwrite", "--repair"):
        both = fill_cli(exp, flag)
        assert both.exit_code == 2 and both.output.startswith(f"error: --from-trajectory and {flag} contradict: ")
    bad = fill_cli(exp, "--store", "maps,colour")
    assert bad.exit_code == 2 and bad.output.startswith("error: --store 'maps,colour': store ['maps', 'colour'] is not")
    with pytest.raises(UserError, match=r"store \['maps', 'maps'\] is not a non-empty list of distinct tiers .*; "
                       r"--from-trajectory adds maps and/or pooled$"):
        Extraction(load_config(exp)).fill_from_trajectory("val", tiers=["maps", "maps"])

    exp = write_exp("traj.yaml", layer_idxs=FEW, store=["trajectory"], cache_dir=str(tmp_path / "traj"))
    cfg = load_config(exp)
    path = Extraction(cfg).run("val", progress=False).path
    build_demo_backbone(tmp_path / "other", img_size=64, seed=1)  # the same architecture, other weights
    other = Extraction(load_config(exp, {"pretrained_model_name_or_path": str(tmp_path / "other")}))
    with pytest.raises(CacheError, match=rf"^cache {re.escape(path)} was built from backbone [0-9a-f]+, but .* names "
                       rf"{re.escape(str(tmp_path / 'other'))} \(backbone [0-9a-f]+\); set pretrained_model_name_or_path"):
        other.fill_from_trajectory("val", tiers=["maps"], progress=False)
    with pytest.raises(CacheMismatch, match=r"extraction\.prompt: cache 'A satellite image', requested 'A map'.*; fill "
                       r"it with the config and device it was extracted with"):
        Extraction(load_config(exp, {"prompt": "A map"})).fill_from_trajectory("val", tiers=["maps"], progress=False)
    writer = CacheWriter.reopen(path, json.loads(json.dumps(open_cache(path).request)))
    writer.clear_done([1])
    result = fill_cli(exp, "--store", "maps")
    assert result.exit_code == 2 and result.output == (
        f"error: cache {path} is incomplete (4 of 8 samples extracted); finish it with `satdifuser extract CONFIG "
        "--store trajectory`, then fill it from its trajectory\n")
    assert ATTRS_KEY in zarr.open_group(path, mode="r").attrs and open_cache(path).tiers == ("trajectory",)
    missing = fill_cli(write_exp("none.yaml", cache_dir=str(tmp_path / "none")))
    assert missing.exit_code == 2 and missing.output.startswith("error: no cache at ")
