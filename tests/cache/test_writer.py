import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.audit import verify_cache
from pipeline.cache.layout import CachePlan, array_specs, pooled_path
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.cache.writer import CacheWriter
from tests.cache.fake_cache import PLAN, REQUEST, build, fake_shard


def test_a_shard_missing_an_array_is_not_written(tmp_path):
    writer = CacheWriter.create(str(tmp_path / "c.zarr"), REQUEST, PLAN)
    arrays = fake_shard(PLAN, 0)
    del arrays["latents"]
    with pytest.raises(ValueError, match=r"lacks arrays \['latents'\]"):
        writer.write_shard(0, arrays)
    assert writer.pending_shards() == [0, 1, 2]


def test_reopen_same_request_resumes_other_request_is_refused(tmp_path):
    path = str(tmp_path / "c.zarr")
    build(path, shards=[0])
    again = CacheWriter.reopen(path, REQUEST)
    assert again.plan == PLAN and again.pending_shards() == [1, 2]
    other = {**REQUEST, "extraction": {"save_timesteps": [47], "prompt": "p"}}
    with pytest.raises(CacheError) as err:
        CacheWriter.reopen(path, other)
    assert "extraction.save_timesteps: cache [47, 40], requested [47]" in str(err.value)
    assert "--overwrite" in str(err.value)


def test_half_created_store_counts_as_none(tmp_path, monkeypatch):
    import pipeline.cache.writer as writer_module

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "_create_arrays", dies)
    with pytest.raises(KeyboardInterrupt):
        CacheWriter.create(str(tmp_path / "c.zarr"), REQUEST, PLAN)
    assert CacheWriter.reopen(str(tmp_path / "c.zarr"), REQUEST) is None
    assert CacheWriter.reopen(str(tmp_path / "nothing.zarr"), REQUEST) is None


def test_what_is_not_a_cache_is_refused_and_kept(tmp_path):
    import zarr

    folder = tmp_path / "plain.zarr"
    folder.mkdir()
    (folder / "important.txt").write_text("keep me")
    with pytest.raises(CacheError, match="exists but is not a feature cache; move it away or pass --overwrite"):
        CacheWriter.reopen(str(folder), REQUEST)
    assert (folder / "important.txt").read_text() == "keep me"
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(1,), dtype="f4")
    with pytest.raises(CacheError, match="not a feature cache"):
        CacheWriter.reopen(str(tmp_path / "other.zarr"), REQUEST)
    assert (tmp_path / "other.zarr" / "x").exists()


def test_other_format_versions_are_refused(tmp_path):
    import zarr

    build(tmp_path / "c.zarr")
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    root.attrs["satdifuser"] = {**root.attrs["satdifuser"], "format_version": 0}
    with pytest.raises(CacheError, match="format version 0"):
        CacheWriter.reopen(str(tmp_path / "c.zarr"), REQUEST)


def test_shards_equal_to_the_fill_value_are_stored(tmp_path):
    writer = CacheWriter.create(str(tmp_path / "c.zarr"), REQUEST, PLAN)
    for shard in range(PLAN.num_shards):
        arrays = fake_shard(PLAN, shard)
        arrays["labels"] = np.zeros_like(arrays["labels"])  # a shard of class 0
        writer.write_shard(shard, arrays)
    # Resumed writers open arrays afresh; they must store such shards too.
    resumed = CacheWriter.reopen(str(tmp_path / "c.zarr"), REQUEST)
    arrays = fake_shard(PLAN, 1)
    arrays["labels"] = np.zeros_like(arrays["labels"])
    resumed.write_shard(1, arrays)
    assert verify_cache(open_cache(str(tmp_path / "c.zarr"))) == []


def test_sample_names_are_zarr_v3_strings_in_vlen_utf8(tmp_path):
    """Decoded from the bytes on disk as the zarr-extensions `vlen-utf8` codec specifies, without zarr."""
    import numcodecs

    build(tmp_path / "c.zarr")
    meta = json.loads((tmp_path / "c.zarr" / "sample_names" / "zarr.json").read_text())
    assert meta["data_type"] == "string" and [c["name"] for c in meta["codecs"]] == ["vlen-utf8", "blosc", "crc32c"]
    raw = (tmp_path / "c.zarr" / "sample_names" / "c" / "1").read_bytes()[:-4]  # the crc32c goes last
    data = numcodecs.Blosc().decode(raw)
    count, offset, names = int.from_bytes(data[:4], "little"), 4, []
    for _ in range(count):
        length = int.from_bytes(data[offset:offset + 4], "little")
        names.append(bytes(data[offset + 4:offset + 4 + length]).decode("utf-8"))
        offset += 4 + length
    assert names == ["s4", "s5", "s6", "s7"]


def consolidated_arrays(path) -> set | None:
    doc = json.loads((Path(path) / "zarr.json").read_text())
    if "consolidated_metadata" not in doc:
        return None
    return {k for k, v in doc["consolidated_metadata"]["metadata"].items() if v["node_type"] == "array"}


def test_consolidated_metadata_is_dropped_while_arrays_change_and_fresh_after_a_fill(tmp_path):
    import xarray as xr

    path = tmp_path / "c.zarr"
    plan = CachePlan(**{**PLAN.__dict__, "tiers": ("trajectory",)})
    writer = CacheWriter.create(str(path), REQUEST, plan)
    for shard in range(plan.num_shards):
        writer.write_shard(shard, {k: v for k, v in fake_shard(plan, shard).items() if k in writer.array_paths()})
    writer.consolidate()
    assert consolidated_arrays(path) == {spec.name for spec in array_specs(plan)}
    fill = CacheWriter.reopen(str(path), REQUEST).begin_fill(["pooled"])
    assert consolidated_arrays(path) is None  # the fill's arrays are not in a copy made before them
    for shard in range(plan.num_shards):
        fill.write_shard(shard, {k: v for k, v in fake_shard(PLAN, shard).items() if k.startswith("pooled/")})
    fill.finish_fill()
    filled = {spec.name for spec in array_specs(fill.plan)}
    assert consolidated_arrays(path) == filled and pooled_path("t40", "up_blocks_3_conv2_2") in filled
    tree = xr.open_datatree(str(path), engine="zarr", consolidated=True)
    np.testing.assert_array_equal(tree[pooled_path("t40", "up_blocks_3_conv2_2")].values,
                                  open_cache(str(path)).pooled(range(10), ["t40"])["t40"]["up_blocks_3_conv2_2"])
    # An array deleted by hand and created again empty: the copy that listed the old one goes first.
    shutil.rmtree(path / "latents")
    assert CacheWriter.reopen(str(path), REQUEST).restore_arrays() == ["latents"]
    assert consolidated_arrays(path) is None
