import numpy as np
import pytest
import torch
import zarr

from pipeline.backbone.loader import load_diffusionsat
from pipeline.cache.audit import verify_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.cache.writer import CacheWriter
from pipeline.data.geobench_task import GeoBenchSplit, TaskSource
from pipeline.extract.extractor import FeatureExtractor, seeded_normal
from pipeline.extract.run import backbone_spec, extract_split, extraction_settings
from tests.zarr_arrays import all_arrays


def test_cache_holds_what_live_extraction_computes(make_config):
    cfg = make_config()
    result = extract_split(cfg, "train", progress=False)
    assert result.extracted == result.num_samples == 20 and result.unet_passes == 200
    cache = open_cache(result.path)
    assert verify_cache(cache) == []
    assert len(cache.layers) == 21 and cache.timesteps == ["t47", "t45", "t40"]

    dataset = GeoBenchSplit(TaskSource.from_config(cfg), "train")
    samples = [dataset[i] for i in range(len(dataset))]
    extractor = FeatureExtractor(load_diffusionsat(backbone_spec(cfg)), extraction_settings(cfg))
    live = extractor(torch.stack([s["image"] for s in samples]), [s["name"] for s in samples])  # one batch of 20

    assert cache.sample_names == [s["name"] for s in samples]
    np.testing.assert_array_equal(cache.labels(range(20)).numpy(), [int(s["label"]) for s in samples])
    torch.testing.assert_close(cache.latents(range(20)), live.latents, rtol=0, atol=1e-5)
    feats = cache.features(range(20))
    pooled = cache.pooled(range(20))
    for t in cache.timesteps:
        for layer in cache.layers:
            # Cached in batches of 3 within shards of 4, live in one batch of 20: same numbers.
            torch.testing.assert_close(feats[t][layer], live.maps[t][layer], rtol=0, atol=2e-3)
            torch.testing.assert_close(pooled[t][layer], live.pooled[t][layer], rtol=0, atol=1e-4)


def test_second_run_finds_the_cache_complete(make_config):
    cfg = make_config(shard_size=8)
    extract_split(cfg, "test", progress=False)
    again = extract_split(cfg, "test", progress=False)
    assert again.extracted == 0 and again.unet_passes == 0


def test_resume_after_a_kill_equals_an_uninterrupted_run(make_config, tmp_path, monkeypatch):
    cfg = make_config()
    whole = extract_split(cfg, "train", path=str(tmp_path / "whole.zarr"), progress=False)

    real_write = CacheWriter.write_shard
    calls = []

    def dying_write(self, shard, arrays, work=None, before_done=None):
        calls.append(shard)
        if len(calls) == 3:  # write part of the third shard's arrays, then die
            for name in list(arrays)[: len(arrays) // 2]:
                start, stop = self.plan.shard_range(shard)
                self.root[name][start:stop] = arrays[name]
            raise KeyboardInterrupt("killed")
        real_write(self, shard, arrays, work, before_done)

    monkeypatch.setattr(CacheWriter, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract_split(cfg, "train", path=str(tmp_path / "resumed.zarr"), progress=False)
    monkeypatch.setattr(CacheWriter, "write_shard", real_write)

    partial = open_cache(str(tmp_path / "resumed.zarr"))
    assert partial.done.tolist() == [True] * 8 + [False] * 12  # the half-written shard is not done
    resumed = extract_split(cfg, "train", path=str(tmp_path / "resumed.zarr"), progress=False)
    assert resumed.extracted == 12

    a, b = all_arrays(whole.path), all_arrays(resumed.path)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_other_settings_are_refused_unless_overwrite(make_config):
    extract_split(make_config(), "val", progress=False)
    changed = make_config(save_timesteps=[47], prompt="A satellite image of farms")
    with pytest.raises(CacheError) as err:
        extract_split(changed, "val", progress=False)
    message = str(err.value)
    assert "extraction.save_timesteps: cache [47, 45, 40], requested [47]" in message
    assert "extraction.prompt" in message and "--overwrite" in message
    result = extract_split(changed, "val", overwrite=True, progress=False)
    assert result.extracted == 8 and open_cache(result.path).timesteps == ["t47"]
    # What a DVC stage does when its settings changed: replace the stale cache.
    replaced = extract_split(make_config(), "val", replace_mismatched=True, progress=False)
    assert replaced.extracted == 8 and open_cache(replaced.path).timesteps == ["t47", "t45", "t40"]


def test_segmentation_labels_are_maps_at_original_size(make_config):
    cfg = make_config("demo_seg", layer_idxs={"up_blocks": {"attn1": [], "conv2": [[1, 0], [3, 2]]}})
    cache = open_cache(extract_split(cfg, "val", progress=False).path)
    assert cache.layers == ["up_blocks_1_conv2_0", "up_blocks_3_conv2_2"]
    labels = cache.labels(range(len(cache)))
    assert labels.shape == (8, 64, 64) and labels.dtype == torch.uint8
    dataset = GeoBenchSplit(TaskSource.from_config(cfg), "val")
    np.testing.assert_array_equal(labels[3].numpy(), dataset[3]["label"])


def test_generation_mode_noises_the_latent_to_each_label(make_config):
    cfg = make_config(diffusion_mode="generation", save_timesteps=[47, 40])
    result = extract_split(cfg, "val", progress=False)
    assert result.unet_passes == 2 * 8
    cache = open_cache(result.path)
    assert cache.request["extraction"]["unet_timesteps"] == {"t47": 41, "t40": 181}
    latents, traj = cache.latents(range(8)), cache.trajectory(range(8))
    noise = seeded_normal(latents.shape[1:], cache.sample_names, cfg.seed, "noise")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    for key, t in (("t47", 41), ("t40", 181)):
        ab = torch.cumprod(1 - betas, 0)[t]
        torch.testing.assert_close(traj[key], ab.sqrt() * latents + (1 - ab).sqrt() * noise)


def test_a_split_smaller_than_a_shard(make_config):
    result = extract_split(make_config(shard_size=50), "test", progress=False)
    cache = open_cache(result.path)
    assert cache.plan.num_shards == 1 and len(cache) == 8 and verify_cache(cache) == []


def test_multi_label_labels_reach_the_cache(make_config, multilabel_root):
    root, labels = multilabel_root
    cfg = make_config(geobench_dir=str(root), dataset_name="toy-multilabel", task="multi_label_classification",
                      num_classes=5, geobench_task="classification_v1.0/toy-multilabel", class_list=None)
    cache = open_cache(extract_split(cfg, "train", progress=False).path)
    got = cache.labels(range(len(cache))).numpy()
    assert got.dtype == np.uint8 and got.shape == (6, 5)
    np.testing.assert_array_equal(got, np.stack([labels[n] for n in cache.sample_names]))


def test_a_cache_is_not_replaced_only_because_the_device_differs(make_config):
    cfg = make_config()
    path = extract_split(cfg, "val", progress=False).path
    root = zarr.open_group(path, mode="r+")
    attrs = root.attrs["satdifuser"]
    attrs["request"]["extraction"]["precision"] = "cuda-fp16-autocast"  # as if built on a GPU
    root.attrs["satdifuser"] = attrs
    with pytest.raises(CacheError, match="--device"):
        extract_split(cfg, "val", replace_mismatched=True, progress=False)
    assert open_cache(path).request["extraction"]["precision"] == "cuda-fp16-autocast"


def test_changed_data_changes_the_request(demo_root, make_config, tmp_path):
    import shutil

    root = tmp_path / "gb"
    shutil.copytree(demo_root, root)
    cfg = make_config(geobench_dir=str(root))
    split = GeoBenchSplit(TaskSource.from_config(cfg), "val")
    before = split.provenance()["content_sha256"]
    with open(root / "classification_v1.0" / "demo-landcover" / f"{split.names[0]}.hdf5", "ab") as f:
        f.write(b"\0")
    assert GeoBenchSplit(TaskSource.from_config(cfg), "val").provenance()["content_sha256"] != before


def test_the_dvc_stage_extracts_with_params_yaml(make_config, tmp_path, monkeypatch, demo_root, tiny_backbone):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from cli import app

    shutil.copytree("configs", tmp_path / "configs")
    overrides = {"geobench_dir": str(demo_root), "pretrained_model_name_or_path": str(tiny_backbone.root),
                 "img_size": 64, "shard_size": 4, "num_workers": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"extract": {"device": "cpu", "overrides": overrides}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["extract", "configs/demo_cls_exp.yaml", "--split", "test", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("cache/demo-landcover/test.zarr: 8 samples, 8 extracted, "), result.output
    cache = open_cache("cache/demo-landcover/test.zarr")
    assert cache.complete and len(cache) == 8


# ---- selections, damaged caches, overwrite, one writer ---------------------------------------------

FEW = {"up_blocks": {"attn1": [[1, 0]], "conv2": [[3, 2]]}}  # two layers keep these tests quick


def test_an_attn1_ablation_extracts_only_the_nine_attn1_layers(make_config):
    cfg = make_config(layer_idxs={"up_blocks": {"attn1": "all"}})
    cache = open_cache(extract_split(cfg, "test", progress=False).path)
    assert cache.layers == [f"up_blocks_{i}_attn1_{j}" for i in (1, 2, 3) for j in range(3)]
    assert cache.layer_catalog == {"up_blocks": {"attn1": [0, 3, 3, 3]}}
    assert sorted(zarr.open_group(cache.path, mode="r")["features/t47"].array_keys()) == sorted(cache.layers)


def test_a_selector_that_matches_nothing_stops_before_anything_is_written(make_config):
    from pathlib import Path

    from pipeline.backbone.layer_spec import LayerSpecError

    cfg = make_config(layer_idxs={"up_blocks": {"attn1": "all", "attn9": "all"}})
    with pytest.raises(LayerSpecError, match="layer_idxs up_blocks.attn9: all matches nothing"):
        extract_split(cfg, "test", progress=False)
    assert not Path(cfg.cache_path("test")).exists() and not Path(cfg.cache_path("test") + ".lock").exists()


def test_a_done_shard_whose_files_are_gone_is_extracted_again(make_config, tmp_path):
    from pathlib import Path

    cfg = make_config(layer_idxs=FEW)
    whole = extract_split(cfg, "train", path=str(tmp_path / "whole.zarr"), progress=False)
    path = extract_split(cfg, "train", progress=False).path
    (Path(path) / "features/t45/up_blocks_3_conv2_2/c/2/0/0/0").unlink()
    (Path(path) / "labels/c/4").unlink()
    with pytest.raises(CacheError, match=r"rows 8-11: its shard file .* is missing; run `satdifuser cache verify"):
        open_cache(path).features([9])
    with pytest.raises(CacheError, match=r"array labels, rows 16-19: its stored object labels/c/4 is missing"):
        open_cache(path).labels([17])
    again = extract_split(cfg, "train", progress=False)
    assert again.extracted == 8  # shards 2 and 4, nothing else
    a, b = all_arrays(whole.path), all_arrays(path)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert open_cache(path).attrs["ledger"]["images_extracted"] == 28  # 20, then the 8 done again


def test_repair_re_extracts_the_shards_verify_finds_damaged(make_config):
    from pathlib import Path

    from pipeline.extract.run import Extraction

    cfg = make_config(layer_idxs=FEW)
    path = extract_split(cfg, "train", progress=False).path
    want = all_arrays(path)
    chunk = Path(path) / "pooled/t47/up_blocks_1_attn1_0/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"array pooled/t47/up_blocks_1_attn1_0, rows 4-7: cannot be read "
                                         r"\(ValueError: Stored and computed checksum"):
        open_cache(path).pooled([5])
    # Every file is there, so a plain run trusts the cache; only a verify reads every checksum.
    assert extract_split(cfg, "train", progress=False).extracted == 0
    repaired = Extraction(cfg).run("train", repair=True, progress=False)
    assert repaired.extracted == 4 and verify_cache(open_cache(path)) == []
    for name, value in want.items():
        np.testing.assert_array_equal(value, all_arrays(path)[name], err_msg=name)


def test_a_complete_cache_on_read_only_media_is_read_and_left_alone(make_config, read_only):
    from pathlib import Path

    cfg = make_config(layer_idxs=FEW)
    path = extract_split(cfg, "test", progress=False).path
    with read_only(Path(path).parent):
        assert extract_split(cfg, "test", progress=False).extracted == 0
        cache = open_cache(path)
        assert cache.features([0, 7])["t47"]["up_blocks_1_attn1_0"].shape[0] == 2 and verify_cache(cache) == []


def test_a_read_only_cache_with_work_left_is_refused_before_computing(make_config, read_only):
    cfg = make_config(layer_idxs=FEW)
    path = extract_split(cfg, "train", progress=False).path
    CacheWriter.reopen(path, open_cache(path).request).clear_done([1])
    with read_only(path):
        with pytest.raises(CacheError, match=f"cache {path} is not writable"):
            extract_split(cfg, "train", progress=False)
    assert open_cache(path).done.sum() == 16


KILL_AT = """
import os, signal, sys
import zarr
from pipeline.cache.writer import CacheWriter
from pipeline.config import load_config
from pipeline.extract.run import Extraction

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "emptying":  # the old store's first array is deleted, then the process dies
    delete = zarr.Group.__delitem__
    zarr.Group.__delitem__ = lambda self, key: (delete(self, key), die())
else:  # the first shard of the new store is written, then the process dies
    write = CacheWriter.write_shard
    CacheWriter.write_shard = lambda self, *a, **k: die() if self.done_shards() else write(self, *a, **k)
Extraction(load_config(sys.argv[1])).run("train", overwrite=True, progress=False)
"""


@pytest.mark.parametrize("moment", ["emptying", "writing"])
def test_a_killed_overwrite_never_leaves_a_store_that_claims_to_be_complete(write_exp, tmp_path, moment):
    import subprocess
    import sys

    from pipeline.config import load_config
    from pipeline.extract.run import Extraction

    old_exp = write_exp("old.yaml", layer_idxs=FEW)
    new_exp = write_exp("new.yaml", layer_idxs=FEW, prompt="A satellite image of farms")
    path = Extraction(load_config(old_exp)).run("train", progress=False).path
    wanted = Extraction(load_config(new_exp)).run("train", path=str(tmp_path / "wanted.zarr"), progress=False)
    killed = subprocess.run([sys.executable, "-c", KILL_AT, str(new_exp), moment], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    if moment == "emptying":
        with pytest.raises(CacheError, match="is being created or replaced and holds nothing yet"):
            open_cache(path)
    else:
        cache = open_cache(path)
        assert cache.request["extraction"]["prompt"] == "A satellite image of farms"
        assert cache.done.tolist() == [True] * 4 + [False] * 16
    resumed = Extraction(load_config(new_exp)).run("train", progress=False)  # no --overwrite needed
    assert resumed.extracted == (20 if moment == "emptying" else 16)
    a, b = all_arrays(wanted.path), all_arrays(path)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_dvc_stage_refuses_a_task_entry_whose_dataset_is_not_the_configs(tmp_path, monkeypatch):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from cli import app

    shutil.copytree("configs", tmp_path / "configs")
    entry = {"config": "demo_cls", "dataset": "landcover", "geobench": "classification_v1.0/demo-landcover"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tasks": [entry], "extract": {"device": "cpu", "overrides": {}}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["extract", "configs/demo_cls_exp.yaml", "--split", "test", "--params", "params.yaml"])
    err = result.stderr
    assert result.exit_code == 2 and err.count("\n") == 1 and not result.stdout
    assert err.startswith(f"error: params.yaml tasks entry {entry}: dataset 'landcover', but configs/demo_cls_exp.yaml "
                          "has dataset_name 'demo-landcover': the extraction would write cache/demo-landcover/test.zarr "
                          "where dvc.yaml expects cache/landcover/test.zarr; make the entry's dataset 'demo-landcover'")
    assert not (tmp_path / "cache").exists()


def test_a_deleted_array_is_created_again_and_its_shards_extracted(make_config, tmp_path):
    import shutil
    from pathlib import Path

    cfg = make_config(layer_idxs=FEW)
    whole = extract_split(cfg, "test", path=str(tmp_path / "whole.zarr"), progress=False)
    path = extract_split(cfg, "test", progress=False).path
    shutil.rmtree(Path(path) / "features/t47/up_blocks_1_attn1_0")
    shutil.rmtree(Path(path) / "done")
    with pytest.raises(CacheError, match="lacks its array done"):
        open_cache(path)
    assert extract_split(cfg, "test", progress=False).extracted == 8
    assert verify_cache(open_cache(path)) == []
    a, b = all_arrays(whole.path), all_arrays(path)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def stored_arrays(path: str) -> set[str]:
    return set(all_arrays(path))


@pytest.mark.parametrize("store, held", [
    (["pooled"], {"pooled"}),
    (["trajectory"], {"trajectory", "latents"}),
    (["trajectory", "maps"], {"features", "trajectory", "latents"}),
])
def test_store_writes_only_the_arrays_of_its_tiers(make_config, store, held):
    cfg = make_config(store=store, layer_idxs={"up_blocks": {"attn1": [[1, 0]], "conv2": [[3, 2]]}})
    result = extract_split(cfg, "val", progress=False)
    assert result.extracted == 8
    names = stored_arrays(result.path)
    assert {n.split("/")[0] for n in names} == held | {"labels", "sample_names", "done"}
    cache = open_cache(result.path)
    assert cache.tiers == tuple(t for t in ("maps", "pooled", "trajectory") if t in store)
    assert verify_cache(cache) == []
    assert len(cache.sample_names) == 8 and all(cache.sample_names)


@pytest.mark.parametrize("mode, save, passes", [("inversion", [47, 45, 40], 10), ("generation", [47, 40], 0)])
def test_a_trajectory_only_extraction_stores_the_trajectory_of_a_full_one(make_config, tmp_path, mode, save, passes):
    # Without maps or pooled vectors no layer is hooked: the inversion still runs its steps, while
    # noised latents need no UNet pass at all.
    settings = {"diffusion_mode": mode, "save_timesteps": save}
    full = extract_split(make_config(**settings), "val", progress=False)
    only = extract_split(make_config(store=["trajectory"], **settings), "val", path=str(tmp_path / "t.zarr"),
                         progress=False)
    assert only.unet_passes == passes * 8 and open_cache(only.path).attrs["ledger"]["unet_passes"] == passes * 8
    want, have = all_arrays(full.path), all_arrays(only.path)
    assert {k for k in have if k.startswith(("trajectory", "latents"))} == {k for k in want
                                                                           if k.startswith(("trajectory", "latents"))}
    for key in have:
        if key.startswith(("trajectory", "latents", "labels", "sample_names")):
            np.testing.assert_array_equal(have[key], want[key], err_msg=key)


def test_a_pooled_only_cache_holds_the_pooled_vectors_of_a_full_one(make_config, tmp_path):
    full = open_cache(extract_split(make_config(), "val", progress=False).path)
    pooled = open_cache(extract_split(make_config(store=["pooled"]), "val", path=str(tmp_path / "p.zarr"),
                                      progress=False).path)
    for t, by_layer in full.pooled(range(8)).items():
        for layer, want in by_layer.items():
            torch.testing.assert_close(pooled.pooled(range(8))[t][layer], want, rtol=0, atol=1e-5)
    with pytest.raises(CacheError) as err:
        pooled.features([0])
    assert str(err.value) == (f"cache {pooled.path} holds the tiers ['pooled'], not maps, which reading feature maps "
                              "needs; re-extract with `satdifuser extract CONFIG --overwrite --store maps,pooled`")
    with pytest.raises(CacheError, match=r"not trajectory, which reading latents needs"):
        pooled.latents([0])


def test_asking_for_fewer_tiers_than_held_finds_the_cache_complete(make_config):
    path = extract_split(make_config(), "val", progress=False).path
    before = {p: p.stat().st_mtime_ns for p in __import__("pathlib").Path(path).rglob("*")}
    again = extract_split(make_config(store=["pooled"]), "val", progress=False)
    assert again.extracted == 0
    assert {p: p.stat().st_mtime_ns for p in __import__("pathlib").Path(path).rglob("*")} == before


def test_asking_for_a_tier_the_cache_lacks_is_one_line_with_the_fix(make_config):
    extract_split(make_config(store=["pooled", "trajectory"]), "val", progress=False)
    with pytest.raises(CacheError) as err:
        extract_split(make_config(), "val", progress=False)
    path = make_config().cache_path("val")
    assert str(err.value) == (f"cache {path} holds the tiers ['pooled', 'trajectory'], not maps, which store "
                              "maps,pooled,trajectory needs; add it from the stored trajectory with `satdifuser extract "
                              "CONFIG --from-trajectory --store maps`")
    extract_split(make_config(store=["pooled"]), "test", progress=False)
    with pytest.raises(CacheError, match=r"holds the tiers \['pooled'\], not trajectory, which store pooled,trajectory "
                       r"needs; re-extract with `satdifuser extract CONFIG --overwrite --store pooled,trajectory`$"):
        extract_split(make_config(store=["trajectory", "pooled"]), "test", progress=False)
    replaced = extract_split(make_config(), "val", replace_mismatched=True, progress=False)  # as the DVC stage
    assert replaced.extracted == 8 and open_cache(replaced.path).tiers == ("maps", "pooled", "trajectory")


def test_the_default_request_is_the_one_caches_were_built_with(make_config):
    from pipeline.extract.run import Extraction, extraction_request

    extraction = Extraction(make_config())
    request = extraction_request(make_config(), extraction.schedule, extraction.device)
    assert list(request) == ["version", "mode", "num_timesteps", "save_timesteps", "unet_timesteps", "layer_idxs",
                             "prompt", "img_size", "latent", "seed", "metadata", "precision", "feature_dtype", "codec",
                             "shard_size"]
    assert request == extraction_request(make_config(store=["pooled"]), extraction.schedule, extraction.device)
    lossy = extraction_request(make_config(map_encoding="bitround-7"), extraction.schedule, extraction.device)
    assert lossy == {**request, "map_encoding": "bitround-7"}


def test_a_lossy_cache_is_never_resumed_as_an_exact_one_nor_the_reverse(make_config):
    extract_split(make_config(map_encoding="uint8"), "val", progress=False)
    with pytest.raises(CacheError, match=r"extraction.map_encoding: cache 'uint8', requested 'float16'"):
        extract_split(make_config(), "val", progress=False)
    with pytest.raises(CacheError, match=r"extraction.map_encoding: cache 'uint8', requested 'bitround-7'"):
        extract_split(make_config(map_encoding="bitround-7"), "val", progress=False)
    extract_split(make_config(), "test", progress=False)
    with pytest.raises(CacheError, match=r"extraction.map_encoding: cache 'float16', requested 'uint8'"):
        extract_split(make_config(map_encoding="uint8"), "test", progress=False)


@pytest.mark.parametrize("encoding", ["bitround-6", "uint8"])
def test_a_lossy_extraction_records_the_error_of_its_maps_against_the_exact_ones(make_config, tmp_path, encoding):
    from pipeline.cache.audit import map_errors

    exact = open_cache(extract_split(make_config(), "val", progress=False).path)
    lossy = open_cache(extract_split(make_config(map_encoding=encoding), "val", path=str(tmp_path / "l.zarr"),
                                     progress=False).path)
    assert lossy.map_encoding == encoding and lossy.request["extraction"]["map_encoding"] == encoding
    errors = map_errors(lossy)["per_layer"]
    want, got = exact.features(range(8)), lossy.features(range(8))
    for t in exact.timesteps:
        for layer in exact.layers:
            x = want[t][layer].double().numpy()
            err = got[t][layer].double().numpy() - x
            recorded = errors[f"{t}/{layer}"]
            assert recorded["max_abs"] == float(np.abs(err).max())
            assert recorded["rel_l2"] == pytest.approx(np.sqrt((err**2).sum() / (x**2).sum()), rel=1e-9)
    assert verify_cache(lossy) == []


# ---- loader workers and the rate line --------------------------------------------------------------


def test_num_workers_above_the_cores_is_capped_and_said(caplog):
    import logging
    import os

    from pipeline.extract.run import loader_workers, usable_cores

    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    with caplog.at_level(logging.WARNING, logger="pipeline.extract.run"):
        assert loader_workers(cores + 3) == cores
    assert f"num_workers {cores + 3} is more than the {cores} CPU core(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.extract.run"):
        assert loader_workers(cores) == cores and loader_workers(0) == 0
    assert not caplog.text


def test_extraction_with_more_workers_than_cores_runs(make_config, tmp_path, caplog):
    import logging
    import os

    from pipeline.extract.run import Extraction

    cfg = make_config(num_workers=len(os.sched_getaffinity(0)) + 2)
    with caplog.at_level(logging.WARNING, logger="pipeline.extract.run"):
        result = Extraction(cfg).run("val", progress=False)
    assert result.extracted == 8 and "using" in caplog.text


def test_rate_never_reads_zero():
    from pipeline.extract.run import rate_text

    assert rate_text(5, 115.0) == "23.0 s/img"  # 0.04 img/s
    assert rate_text(100, 10.0) == "10.0 img/s"
    assert rate_text(1, 1.0) == "1.0 img/s"
    assert rate_text(0, 0.0) == "no images timed"
    assert all("0.0 img/s" not in rate_text(n, s) for n in (1, 3, 7) for s in (0.5, 20.0, 400.0))
