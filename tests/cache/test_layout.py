import numpy as np
import zarr

from pipeline.cache.layout import CachePlan, array_specs, feature_path, shard_arrays
from tests.cache.fake_cache import PLAN, build


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


SHARDS = CachePlan(num_samples=5, shard_size=2, timesteps=("t47", "t40"), layer_shapes={"a": (4, 2, 2), "b": (8, 1, 1)},
                 latent_shape=(4, 1, 1), label_shape=(), label_dtype="int64", map_encoding="uint8")


def _rows(n: int = 2) -> dict:
    shapes = SHARDS.layer_shapes
    return {
        "labels": np.arange(n), "sample_names": np.array([f"s{i}" for i in range(n)], dtype=object),
        "latents": np.zeros((n, 4, 1, 1), np.float32),
        "trajectory": {t: np.full((n, 4, 1, 1), i, np.float32) for i, t in enumerate(SHARDS.timesteps)},
        "features": {t: {l: np.full((n, *s), i, np.float16) for l, s in shapes.items()} for i, t in enumerate(SHARDS.timesteps)},
        "pooled": {t: {l: np.full((n, s[0]), i, np.float32) for l, s in shapes.items()} for i, t in enumerate(SHARDS.timesteps)},
    }


def test_a_write_supplies_every_array_of_the_layout_but_the_writers_own():
    arrays = shard_arrays(SHARDS, _rows())
    own = [s.name for s in array_specs(SHARDS) if s.name.startswith("feature_scales/") or s.name == "done"]
    assert list(arrays) == [s.name for s in array_specs(SHARDS) if s.name not in own]
    assert own and "done" in own
    np.testing.assert_array_equal(arrays["features/t40/b"], np.ones((2, 8, 1, 1), np.float16))
    np.testing.assert_array_equal(arrays["pooled/t47/a"], np.zeros((2, 4), np.float32))
    np.testing.assert_array_equal(arrays["trajectory/t40"], np.ones((2, 4, 1, 1), np.float32))


def test_only_the_tiers_asked_for_and_the_parts_given_are_taken():
    assert list(shard_arrays(SHARDS, _rows(), ("pooled",))) == ["pooled/t47/a", "pooled/t47/b", "pooled/t40/a", "pooled/t40/b"]
    rows = {k: v for k, v in _rows().items() if k in ("labels", "sample_names")}
    assert list(shard_arrays(SHARDS, rows)) == ["labels", "sample_names"]
