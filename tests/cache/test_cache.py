import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.audit import cache_info, verify_cache
from pipeline.cache.layout import CachePlan, array_specs, feature_path, pooled_path, trajectory_path
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.cache.writer import CacheWriter

PLAN = CachePlan(
    num_samples=10, shard_size=4, timesteps=("t47", "t40"),
    layer_shapes={"up_blocks_1_attn1_0": (8, 4, 4), "up_blocks_3_conv2_2": (4, 8, 8)},
    latent_shape=(4, 8, 8), label_shape=(), label_dtype="int64",
)
REQUEST = {"backbone": {"id": "abc"}, "extraction": {"save_timesteps": [47, 40], "prompt": "p"},
           "dataset": {"name": "toy", "split": "train"}}


def fake_shard(plan: CachePlan, shard: int, seed: int = 0) -> dict:
    start, stop = plan.shard_range(shard)
    n = stop - start
    rng = np.random.default_rng(seed + shard)
    arrays = {"latents": rng.normal(size=(n, *plan.latent_shape)).astype(np.float32),
              "labels": np.arange(start, stop), "sample_names": np.array([f"s{i}" for i in range(start, stop)])}
    for t in plan.timesteps:
        arrays[trajectory_path(t)] = rng.normal(size=(n, *plan.latent_shape)).astype(np.float32)
        for layer, shape in plan.layer_shapes.items():
            maps = rng.normal(size=(n, *shape)).astype(np.float16)
            arrays[feature_path(t, layer)] = maps
            arrays[pooled_path(t, layer)] = maps.astype(np.float32).mean(axis=(2, 3))
    return arrays


def build(path, shards=None, plan=PLAN) -> CacheWriter:
    writer = CacheWriter.create(str(path), REQUEST, plan)
    for shard in range(plan.num_shards) if shards is None else shards:
        writer.write_shard(shard, fake_shard(plan, shard))
    return writer


def test_round_trip_of_any_subset(tmp_path):
    build(tmp_path / "c.zarr")
    cache = open_cache(str(tmp_path / "c.zarr"))
    assert cache.complete and cache.timesteps == ["t47", "t40"] and len(cache) == 10
    want = {s: fake_shard(PLAN, s) for s in range(3)}
    feats = cache.features([1, 5, 9], timesteps=["t40"], layers=["up_blocks_3_conv2_2"])
    assert list(feats) == ["t40"] and list(feats["t40"]) == ["up_blocks_3_conv2_2"]
    got = feats["t40"]["up_blocks_3_conv2_2"].numpy()
    path = feature_path("t40", "up_blocks_3_conv2_2")
    np.testing.assert_array_equal(got, np.stack([want[0][path][1], want[1][path][1], want[2][path][1]]))
    np.testing.assert_array_equal(cache.labels([2, 3, 4]).numpy(), [2, 3, 4])
    assert cache.sample_names[7] == "s7"
    contiguous = cache.pooled(range(4, 8), timesteps=["t47"])["t47"]["up_blocks_1_attn1_0"].numpy()
    np.testing.assert_array_equal(contiguous, want[1][pooled_path("t47", "up_blocks_1_attn1_0")])


def test_unselected_arrays_are_never_read(tmp_path):
    build(tmp_path / "c.zarr")
    # Remove everything but one array's data: reading it must still work.
    shutil.rmtree(tmp_path / "c.zarr" / "features" / "t47")
    shutil.rmtree(tmp_path / "c.zarr" / "pooled")
    cache = open_cache(str(tmp_path / "c.zarr"))
    out = cache.features([0, 1], timesteps=["t40"], layers=["up_blocks_1_attn1_0"])
    assert out["t40"]["up_blocks_1_attn1_0"].shape == (2, 8, 4, 4)


def test_asking_for_what_the_cache_lacks_lists_what_it_holds(tmp_path):
    build(tmp_path / "c.zarr")
    cache = open_cache(str(tmp_path / "c.zarr"))
    with pytest.raises(CacheError, match=r"no timesteps \['t45'\]; it holds \['t47', 't40'\]"):
        cache.features([0], timesteps=["t45"])
    with pytest.raises(CacheError, match=r"no layers \['mid_block'\]"):
        cache.dataset(layers=["mid_block"])


def test_partial_cache_reports_pending_shards_and_refuses_undone_reads(tmp_path):
    writer = build(tmp_path / "c.zarr", shards=[0, 2])
    assert writer.pending_shards() == [1]
    cache = open_cache(str(tmp_path / "c.zarr"))
    assert not cache.complete
    cache.features([0, 9])  # done rows read fine
    with pytest.raises(CacheError, match="incomplete: 1 of the requested samples"):
        cache.features([3, 4])


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


def test_reader_checks_expected_provenance(tmp_path):
    build(tmp_path / "c.zarr")
    open_cache(str(tmp_path / "c.zarr"), expect={"backbone": {"id": "abc"}})
    with pytest.raises(CacheError, match="backbone.id: cache 'abc', requested 'xyz'"):
        open_cache(str(tmp_path / "c.zarr"), expect={"backbone": {"id": "xyz"}})
    with pytest.raises(CacheError, match="no cache at"):
        open_cache(str(tmp_path / "missing.zarr"))


def test_verify_passes_on_a_sound_cache_and_info_counts_bytes(tmp_path):
    build(tmp_path / "c.zarr")
    cache = open_cache(str(tmp_path / "c.zarr"))
    assert verify_cache(cache) == []
    info = cache_info(cache)
    raw = 10 * 2 * (8 * 4 * 4 + 4 * 8 * 8) * 2
    assert info["feature_bytes_raw_fp16"] == raw and info["num_samples"] == 10 and info["done"] == 10
    assert 0 < info["feature_bytes_on_disk"]
    assert info["compression_ratio"] == pytest.approx(raw / info["feature_bytes_on_disk"], rel=1e-2)


def _shard_file(root: Path, t="t47", layer="up_blocks_3_conv2_2", shard=1) -> Path:
    return root / "features" / t / layer / "c" / str(shard) / "0" / "0" / "0"


def test_verify_catches_missing_truncated_and_inconsistent_data(tmp_path):
    root = tmp_path / "c.zarr"
    build(root)
    _shard_file(root).unlink()
    problems = verify_cache(open_cache(str(root)))
    assert problems == ["shard 1 (rows 4-7) is marked done but 1 of its stored objects are missing: "
                        "features/t47/up_blocks_3_conv2_2/c/1/0/0/0"]

    build(root)
    f = _shard_file(root)
    f.write_bytes(f.read_bytes()[:-20])
    assert verify_cache(open_cache(str(root))) == [
        "features/t47/up_blocks_3_conv2_2: shard 1 (rows 4-7): its index fails its checksum"]

    build(root)
    pooled = __import__("zarr").open_array(str(root / "pooled" / "t40" / "up_blocks_1_attn1_0"))
    pooled[0] = pooled[0] + 5
    assert any("differs from the mean of its maps" in p for p in verify_cache(open_cache(str(root))))

    build(root, shards=[0, 1])
    assert "2 of 10 samples are not marked done" in verify_cache(open_cache(str(root)))[0]

    build(root)
    f = root / "done" / "c" / "1"
    f.write_bytes(f.read_bytes()[:-3])
    cache = open_cache(str(root))
    assert cache.done.tolist() == [True] * 4 + [False] * 4 + [True] * 2  # damaged flags: not done
    problems = verify_cache(cache)
    assert "4 of 10 samples are not marked done (shards 1)" in problems[0]
    assert any(p.startswith("done: shard 1 (rows 4-7): cannot be read") for p in problems)
    assert CacheWriter.reopen(str(root), REQUEST).pending_shards() == [1]


def test_file_url_store(tmp_path):
    url = (tmp_path / "c.zarr").as_uri()
    build(url)
    cache = open_cache(url)
    assert cache.complete and verify_cache(cache) == []


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


@pytest.mark.parametrize("change, message", [
    (lambda a: a["plan"].update(num_samples=-5), "damaged attributes: its plan has an invalid num_samples (-5)"),
    (lambda a: a["plan"].update(num_samples=10**9), "array done has shape (10,), its attributes say (1000000000,)"),
    (lambda a: a.pop("plan"), "damaged attributes: its plan is missing"),
    (lambda a: a["plan"].pop("layer_shapes"), "damaged attributes: its plan lacks 'layer_shapes'"),
    (lambda a: a["plan"].update(layer_shapes={"x": [4, -1, 8]}), "its plan has an invalid layer_shapes"),
    (lambda a: a["plan"].update(shard_size=0), "its plan has an invalid shard_size (0)"),
    (lambda a: a.pop("request"), "damaged attributes: its request is missing"),
])
def test_crafted_attributes_are_refused_with_one_line(tmp_path, change, message):
    import zarr
    from typer.testing import CliRunner

    from cli import app

    build(tmp_path / "c.zarr")
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    attrs = root.attrs["satdifuser"]
    change(attrs)
    root.attrs["satdifuser"] = attrs
    with pytest.raises(CacheError) as err:
        open_cache(str(tmp_path / "c.zarr"))
    assert message in str(err.value)
    info = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "c.zarr")])
    assert info.exit_code == 2 and info.output.count("\n") == 1 and message in info.output
    if "shape" not in message:  # the writer reads only the attributes
        with pytest.raises(CacheError, match="damaged attributes"):
            CacheWriter.reopen(str(tmp_path / "c.zarr"), REQUEST)


def test_an_unknown_protocol_is_named_not_taken_for_a_missing_cache():
    with pytest.raises(CacheError, match="cache location nosuch://bucket/c.zarr: unknown protocol 'nosuch'"):
        open_cache("nosuch://bucket/c.zarr")


@pytest.mark.parametrize("as_url", [False, True])
def test_an_emptied_shard_file_is_missing_data_not_zeros(tmp_path, as_url):
    root = tmp_path / "c.zarr"
    build(root)
    _shard_file(root).write_bytes(b"")  # e.g. a copy that stopped before writing anything
    path = root.as_uri() if as_url else str(root)
    with pytest.raises(CacheError, match=r"array features/t47/up_blocks_3_conv2_2, rows 4-7: "):
        open_cache(path).features([5], ["t47"], ["up_blocks_3_conv2_2"])
    assert "missing: features/t47/up_blocks_3_conv2_2/c/1/0/0/0" in verify_cache(open_cache(path))[0]


def test_every_array_names_its_dimensions_with_one_size_per_name(tmp_path):
    build(tmp_path / "c.zarr")
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r", use_consolidated=False)
    sizes = {}
    for spec in array_specs(PLAN):
        array = root[spec.name]
        assert array.metadata.dimension_names == spec.dims and len(spec.dims) == array.ndim, spec.name
        for dim, size in zip(spec.dims, array.shape):
            assert sizes.setdefault(dim, size) == size, f"{dim} has sizes {sizes[dim]} and {size}"
    assert root[feature_path("t47", "up_blocks_1_attn1_0")].metadata.dimension_names == (
        "sample", "channel_8", "y_4", "x_4")
    assert root["latents"].metadata.dimension_names == ("sample", "latent_channel", "y_8", "x_8")


def test_label_dimensions_and_class_attributes_follow_the_task():
    from pipeline.cache.layout import label_dims
    from pipeline.cache.writer import class_attributes

    assert label_dims(()) == ("sample",) and label_dims((5,)) == ("sample", "class")
    assert label_dims((64, 64)) == ("sample", "y_64", "x_64")
    masks = CachePlan(**{**PLAN.__dict__, "label_shape": (8, 8), "label_dtype": "uint8"})
    assert class_attributes(masks, ["no data", "water"]) == {
        "class_names": ["no data", "water"], "flag_values": [0, 1], "flag_meanings": "no_data water"}
    multi = CachePlan(**{**PLAN.__dict__, "label_shape": (2,), "label_dtype": "uint8"})
    assert class_attributes(multi, ["a", "b"]) == {"class_names": ["a", "b"]}
    assert class_attributes(PLAN, None) == {}


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


def test_our_reader_does_not_trust_consolidated_metadata(tmp_path):
    """An array created after consolidation (a fill's, say) is invisible through the stale copy."""
    path = tmp_path / "c.zarr"
    build(path).consolidate()
    stale = zarr.open_group(str(path), mode="r+")
    stale.create_array("extra", shape=(10,), dtype="int8")
    assert "extra" not in zarr.open_group(str(path), mode="r")  # zarr's default reads the copy
    assert "extra" in open_cache(str(path)).root
