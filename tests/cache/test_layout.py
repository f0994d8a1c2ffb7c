
import zarr

from pipeline.cache.layout import CachePlan, array_specs, feature_path
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
