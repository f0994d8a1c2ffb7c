import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.cache.layout import CachePlan, array_specs, feature_path
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.cache.writer import CacheWriter
from tests.cache.fake_cache import PLAN, REQUEST, build
from tests.zarr_arrays import all_arrays


def read_all(cache, name: str) -> np.ndarray:
    """Every row of one array through the project's own reader."""
    rows = np.arange(len(cache))
    kind, *rest = name.split("/")
    if kind == "features":
        return cache.features(rows, [rest[0]], [rest[1]])[rest[0]][rest[1]].numpy()
    if kind == "pooled":
        return cache.pooled(rows, [rest[0]], [rest[1]])[rest[0]][rest[1]].numpy()
    if kind == "trajectory":
        return cache.trajectory(rows, [rest[0]])[rest[0]].numpy()
    if name == "latents":
        return cache.latents(rows).numpy()
    if name == "labels":
        return cache.labels(rows).numpy()
    if name == "sample_names":
        return np.asarray(cache.sample_names, dtype=object)
    return cache.done


@pytest.mark.parametrize("exp", ["demo_cls", "demo_seg"])
def test_xarray_opens_every_array_of_a_demo_cache_with_the_values_of_open_cache(cached_demo, exp):
    path = cached_demo(exp).cache_path("train")
    cache = open_cache(path)
    direct = xr.open_datatree(path, engine="zarr", consolidated=True)
    ours = cache.to_xarray()
    unet = cache.request["extraction"]["unet_timesteps"]
    for spec in array_specs(cache.plan):
        want = read_all(cache, spec.name)
        variable = direct[spec.name].variable
        assert variable.dims == spec.dims, spec.name
        np.testing.assert_array_equal(variable.values, want, err_msg=spec.name)
        if spec.name != "sample_names":
            assert ours[spec.name].dims == spec.dims
            np.testing.assert_array_equal(ours[spec.name].values, want, err_msg=spec.name)
        if "label" in spec.attrs:
            assert variable.attrs["unet_timestep"] == unet[spec.attrs["label"]]
    np.testing.assert_array_equal(ours["sample"].values, cache.sample_names)
    np.testing.assert_array_equal(ours["features/t45"]["sample"].values, cache.sample_names)  # inherited
    layer = cache.layers[0]
    assert direct[f"features/t40/{layer}"].attrs == {
        "description": f"feature maps of {layer} at label t40", "long_name": f"{layer} maps at t40",
        "label": "t40", "layer": layer, "unet_timestep": 161}
    names = cache.request["dataset"]["class_names"]
    assert direct["labels"].attrs["class_names"] == names == ours["labels"].attrs["class_names"]
    assert direct["labels"].attrs["flag_meanings"].split() == names
    # The extraction consolidated the metadata last: it lists every array the store holds.
    consolidated = json.loads((Path(path) / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert {k for k, v in consolidated.items() if v["node_type"] == "array"} == set(all_arrays(path))


def test_dask_arrays_are_shard_chunked_and_sum_as_numpy_does(cached_demo):
    path = cached_demo("demo_seg").cache_path("val")
    cache = open_cache(path)
    arrays, stored = cache.to_dask(), all_arrays(path)
    assert set(arrays) == set(stored)
    for name, array in arrays.items():
        assert array.chunks[0] == (8,) * (len(cache) // 8) + ((len(cache) % 8,) if len(cache) % 8 else ()), name
        assert all(len(c) == 1 for c in array.chunks[1:]), name
        if name == "sample_names":
            assert list(array.compute()) == cache.sample_names
            continue
        want = stored[name].astype(np.float64).sum()
        np.testing.assert_allclose(float(array.astype(np.float64).sum().compute()), want, rtol=1e-12, err_msg=name)


def test_uint8_maps_come_decoded_as_open_cache_reads_them(tmp_path):
    plan = CachePlan(**{**PLAN.__dict__, "map_encoding": "uint8"})
    build(tmp_path / "c.zarr", plan=plan)
    cache = open_cache(str(tmp_path / "c.zarr"))
    name = feature_path("t40", "up_blocks_3_conv2_2")
    decoded = cache.to_dask()[name].compute()
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, read_all(cache, name))
    assert cache.to_dask(decode=False)[name].dtype == np.uint8
    tree = cache.to_xarray()
    assert tree[name].attrs["decoded_from"] == "uint8" and "scales" not in tree[name].attrs
    np.testing.assert_array_equal(tree[name].values, read_all(cache, name))


def test_what_would_read_as_fill_values_is_refused(tmp_path):
    build(tmp_path / "part.zarr", shards=[0])
    with pytest.raises(CacheError, match=r"incomplete \(4 of 10 samples extracted\).*satdifuser extract"):
        open_cache(str(tmp_path / "part.zarr")).to_xarray()
    build(tmp_path / "c.zarr")
    (tmp_path / "c.zarr" / "pooled" / "t47" / "up_blocks_1_attn1_0" / "c" / "1" / "0").unlink()
    with pytest.raises(CacheError, match=r"shard 1 is marked done but lacks pooled/t47/up_blocks_1_attn1_0/c/1/0"):
        open_cache(str(tmp_path / "c.zarr")).to_dask()


def strip_to_the_old_format(path: Path) -> None:
    """Array metadata as the cache wrote it before dimension names: no names, a description only."""
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        doc.pop("consolidated_metadata", None)
        if doc["node_type"] == "array":
            doc.pop("dimension_names", None)
            doc["attributes"] = {k: v for k, v in doc["attributes"].items() if k in ("description", "encoding",
                                 "decode", "scales", "scales_layout")}
        meta.write_text(json.dumps(doc))


def test_a_cache_without_dimension_names_opens_and_reads_the_same(tmp_path):
    path = tmp_path / "c.zarr"
    build(path)
    before = open_cache(str(path))
    want = {spec.name: read_all(before, spec.name) for spec in array_specs(PLAN)}
    strip_to_the_old_format(path)
    with pytest.raises(KeyError, match="dimension_names"):  # what xarray says of such a store
        xr.open_datatree(str(path), engine="zarr", consolidated=False)
    cache = open_cache(str(path))
    tree = cache.to_xarray()
    for spec in array_specs(PLAN):
        np.testing.assert_array_equal(read_all(cache, spec.name), want[spec.name])
        if spec.name != "sample_names":
            assert tree[spec.name].dims == spec.dims
            np.testing.assert_array_equal(tree[spec.name].values, want[spec.name])
    assert tree["pooled/t47/up_blocks_1_attn1_0"].attrs["layer"] == "up_blocks_1_attn1_0"
    # Still the cache of its request: a writer resumes it rather than refusing or rebuilding it.
    assert CacheWriter.reopen(str(path), REQUEST).pending_shards() == []
