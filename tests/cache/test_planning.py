import os
import shutil
import subprocess

import pytest
import zarr

from pipeline.cache import planning
from pipeline.cache.audit import cache_info
from pipeline.cache.planning import (
    check_room,
    dataset_plan,
    layer_shapes,
    passes_per_epoch,
    pending_shards,
    plan_bytes,
    plan_report,
    variant,
)
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.cache.writer import CacheWriter
from pipeline.data.geobench_task import GeoBenchSplit, TaskSource
from pipeline.errors import UserError
from pipeline.extract.run import Extraction


def planned_and_real(cfg, split, tiers):
    """The plan's bytes for ``tiers`` and the bytes of a cache holding exactly those tiers, written
    by the cache writer from a real extraction's arrays."""
    source = open_cache(cfg.cache_path(split))
    plan = variant(dataset_plan(cfg, GeoBenchSplit(TaskSource.from_config(cfg), split)).plan, tiers)
    if tuple(tiers) == source.plan.tiers:
        return sum(plan_bytes(plan).values()), cache_info(source)["bytes_on_disk"], plan
    path = f"{cfg.cache_dir}/{'-'.join(tiers)}/{split}.zarr"
    writer = CacheWriter.create(path, source.request, variant(source.plan, tiers))
    for shard in range(plan.num_shards):
        rows = slice(*plan.shard_range(shard))
        writer.write_shard(shard, {name: source.root[name][rows] for name in writer.array_paths()})
    return sum(plan_bytes(plan).values()), cache_info(open_cache(path))["bytes_on_disk"], plan


@pytest.mark.parametrize("exp", ["demo_cls", "demo_seg"])
@pytest.mark.parametrize("tiers", [("maps", "pooled", "trajectory"), ("pooled",), ("trajectory",)])
def test_plan_within_ten_percent_of_a_real_extraction(cached_demo, exp, tiers):
    cfg = cached_demo(exp)
    for split in ("train", "test"):
        planned, real, plan = planned_and_real(cfg, split, tiers)
        assert abs(planned - real) <= 0.10 * real, (split, planned, real)


def test_layer_shapes_on_the_meta_device_are_the_extractors(cached_demo):
    cfg = cached_demo("demo_cls")
    assert layer_shapes(cfg) == open_cache(cfg.cache_path("train")).plan.layer_shapes


def test_unet_passes_per_training_image_and_epoch(make_config):
    assert passes_per_epoch(make_config()) == {"maps": 0, "trajectory": 3, "live": 10, "live_vae": 1}
    assert passes_per_epoch(make_config(save_timesteps=[40])) == {"maps": 0, "trajectory": 1, "live": 10, "live_vae": 1}
    assert passes_per_epoch(make_config(diffusion_mode="generation"))["live"] == 3


def test_plan_report_counts_the_tasks_splits_or_the_images_asked(make_config):
    cfg = make_config()
    report = plan_report(cfg)
    assert report["images"] == {"train": 20, "val": 8, "test": 8} and "GEO-Bench task" in report["images_from"]
    rows = {(r["tier"], r["encoding"]): r for r in report["rows"]}
    assert set(rows) == {("maps", "float16"), ("maps", "bitround-5"), ("maps", "bitround-7"), ("maps", "uint8"),
                         ("pooled", None), ("trajectory", None), ("labels", None)}
    for r in rows.values():
        assert r["bytes"]["total"] == r["bytes"]["train"] + r["bytes"]["val"] + r["bytes"]["test"]
    # The whole store is the sum of its tiers and the labels.
    parts = [rows[k]["bytes"]["train"] for k in (("maps", "float16"), ("pooled", None), ("trajectory", None), ("labels", None))]
    assert abs(report["store"]["bytes"]["train"] - sum(parts)) <= 0.01 * sum(parts)

    asked = plan_report(make_config(map_encoding="bitround-3"), images=1000)
    assert asked["images"] == {"train": 1000, "val": 1000, "test": 1000} and asked["images_from"] == "--images 1000 per split"
    assert ("maps", "bitround-3") in {(r["tier"], r["encoding"]) for r in asked["rows"]}
    # Per image, lossy encodings are smaller (on 20 tiny images each array's metadata outweighs that).
    size = {r["encoding"]: r["bytes_per_image"] for r in asked["rows"] if r["tier"] == "maps"}
    assert size["bitround-3"] < size["bitround-5"] < size["bitround-7"] < size["float16"]
    assert size["uint8"] < size["float16"]  # (the tiny maps are 8 x 8 at most, so their scales weigh)
    per_image = {r["tier"]: r["bytes_per_image"] for r in asked["rows"] if r["encoding"] in (None, "float16")}
    shapes = layer_shapes(cfg).values()
    index = 3 * len(shapes) * planning.SHARD_INDEX_ENTRY  # one shard index entry per image and map
    assert per_image["maps"] == pytest.approx(sum(2 * c * h * w for c, h, w in shapes) * 3 / 1.076 + index, rel=0.003)


def test_plan_without_the_task_asks_for_images(make_config, tmp_path):
    with pytest.raises(UserError, match=r"GEO-Bench task not found in .*; pass --images N to plan N images per split"):
        plan_report(make_config(geobench_dir=str(tmp_path)))
    with pytest.raises(UserError, match="--images 0: expected a number of images per split >= 1"):
        plan_report(make_config(), images=0)


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(planning, "free_bytes", lambda path: (free, "/disk"))


def test_extraction_refuses_a_disk_without_room_before_loading_the_backbone(make_config, monkeypatch):
    cfg = make_config()
    extraction = Extraction(cfg)
    dataset_split = dataset_plan(cfg, GeoBenchSplit(extraction.source, "train"))
    need = {tiers: planning.room_needed(variant(dataset_split.plan, tiers), list(range(5)), dataset_split.name_bytes, True)
            for tiers in (("maps", "pooled", "trajectory"), ("pooled", "trajectory"), ("maps",), ("pooled",))}
    _free(monkeypatch, need[("pooled", "trajectory")] + 1)
    with pytest.raises(CacheError) as err:
        extraction.run("train", progress=False)
    text = str(err.value)
    assert text.startswith(f"cache {cfg.cache_path('train')}: store [maps, pooled, trajectory], map_encoding float16 "
                           f"needs {planning.human(need[('maps', 'pooled', 'trajectory')])} for 5 shard(s) of 20 images")
    assert f"but /disk has {planning.human(need[('pooled', 'trajectory')] + 1)} free" in text
    assert f"store [pooled, trajectory] needs {planning.human(need[('pooled', 'trajectory')])} and would fit" in text
    assert "store [maps]" not in text  # it needs more than the room there is
    assert "\n" not in text
    assert extraction._extractor is None and not os.path.exists(cfg.cache_path("train"))

    _free(monkeypatch, 1000)
    with pytest.raises(CacheError, match="no store of fewer tiers .* would fit either"):
        extraction.run("train", progress=False)
    _free(monkeypatch, need[("maps", "pooled", "trajectory")])
    result = extraction.run("val", progress=False)  # 8 images need less than 20
    assert result.extracted == 8


def test_a_resumed_extraction_needs_room_for_its_pending_shards_only(cached_demo, tmp_path, monkeypatch):
    cfg = cached_demo("demo_cls", cache_dir=str(tmp_path / "copy"))
    shutil.copytree(cached_demo("demo_cls").cache_path("train"), cfg.cache_path("train"))
    plan = open_cache(cfg.cache_path("train")).plan
    CacheWriter(zarr.open_group(cfg.cache_path("train"), mode="r+"), cfg.cache_path("train"), plan).clear_done([1])
    assert pending_shards(cfg.cache_path("train"), plan) == [1]
    one = planning.room_needed(plan, [1], 16, fresh=False)
    assert one < planning.room_needed(plan, [0, 1, 2], 16, fresh=True) / 2
    dataset = GeoBenchSplit(TaskSource.from_config(cfg), "train")
    _free(monkeypatch, one + 10_000)
    check_room(cfg, cfg.cache_path("train"), dataset)
    with pytest.raises(CacheError, match="for 3 shard"):
        check_room(cfg, cfg.cache_path("train"), dataset, replace=True)  # --overwrite writes every shard


def test_object_store_urls_are_not_checked(make_config, monkeypatch):
    cfg = make_config()
    _free(monkeypatch, 0)
    check_room(cfg, "s3://bucket/caches/train.zarr", GeoBenchSplit(TaskSource.from_config(cfg), "val"))
    with pytest.raises(CacheError, match="needs"):
        check_room(cfg, "file:///nowhere/train.zarr", GeoBenchSplit(TaskSource.from_config(cfg), "val"))


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a real tmpfs of ``size`` (e.g. "2m") mounted in tmp_path; skipped where
    mounting is not allowed (as a normal user)."""
    mounted = []

    def make(size: str):
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                               capture_output=True).returncode:
            pytest.skip("cannot mount a small filesystem here (needs root)")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_real_small_disk_is_refused_and_left_empty(make_config, small_disk):
    disk = small_disk("2m")
    cfg = make_config(cache_dir=str(disk / "cache"))
    with pytest.raises(CacheError, match=rf"store \[maps, pooled, trajectory\].* but {disk}/cache\S* has .* free; "
                                         r"store \[pooled, trajectory\] needs .* and would fit"):
        Extraction(cfg).run("train", progress=False)
    assert not any((disk / "cache").rglob("*.json")) and not any((disk / "cache").rglob("*.lock"))

    roomy = small_disk("64m")
    result = Extraction(make_config(cache_dir=str(roomy))).run("val", progress=False)
    assert result.extracted == 8
