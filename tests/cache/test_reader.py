import shutil

import numpy as np
import pytest
import zarr

from pipeline.cache.audit import verify_cache
from pipeline.cache.layout import feature_path, pooled_path
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.cache.writer import CacheWriter
from tests.cache.fake_cache import PLAN, REQUEST, _shard_file, build, fake_shard


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


def test_reader_checks_expected_provenance(tmp_path):
    build(tmp_path / "c.zarr")
    open_cache(str(tmp_path / "c.zarr"), expect={"backbone": {"id": "abc"}})
    with pytest.raises(CacheError, match="backbone.id: cache 'abc', requested 'xyz'"):
        open_cache(str(tmp_path / "c.zarr"), expect={"backbone": {"id": "xyz"}})
    with pytest.raises(CacheError, match="no cache at"):
        open_cache(str(tmp_path / "missing.zarr"))


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


@pytest.mark.parametrize("as_url", [False, True])
def test_an_emptied_shard_file_is_missing_data_not_zeros(tmp_path, as_url):
    root = tmp_path / "c.zarr"
    build(root)
    _shard_file(root).write_bytes(b"")  # e.g. a copy that stopped before writing anything
    path = root.as_uri() if as_url else str(root)
    with pytest.raises(CacheError, match=r"array features/t47/up_blocks_3_conv2_2, rows 4-7: "):
        open_cache(path).features([5], ["t47"], ["up_blocks_3_conv2_2"])
    assert "missing: features/t47/up_blocks_3_conv2_2/c/1/0/0/0" in verify_cache(open_cache(path))[0]


def test_our_reader_does_not_trust_consolidated_metadata(tmp_path):
    """An array created after consolidation (a fill's, say) is invisible through the stale copy."""
    path = tmp_path / "c.zarr"
    build(path).consolidate()
    stale = zarr.open_group(str(path), mode="r+")
    stale.create_array("extra", shape=(10,), dtype="int8")
    assert "extra" not in zarr.open_group(str(path), mode="r")  # zarr's default reads the copy
    assert "extra" in open_cache(str(path)).root
