import math

import numpy as np
import pytest
import zarr

from pipeline.cache.audit import cache_info, map_errors, verify_cache
from pipeline.cache.encoding import MANTISSA_BITS, bitround, encode, uint8_decode, uint8_encode
from pipeline.cache.layout import CachePlan, feature_path, feature_scale_path, pooled_path
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import CacheWriter

PLAN = CachePlan(
    num_samples=10, shard_size=4, timesteps=("t47", "t40"),
    layer_shapes={"up_blocks_1_attn1_0": (8, 4, 4), "up_blocks_3_conv2_2": (4, 8, 8)},
    latent_shape=(4, 8, 8), label_shape=(), label_dtype="int64", tiers=("maps", "pooled"),
)
REQUEST = {"backbone": {"id": "abc"}, "extraction": {"map_encoding": "lossy"}, "dataset": {"name": "toy"}}


def exact_shard(plan: CachePlan, shard: int) -> dict:
    start, stop = plan.shard_range(shard)
    rng = np.random.default_rng(shard)
    arrays = {"labels": np.arange(start, stop), "sample_names": np.array([f"s{i}" for i in range(start, stop)])}
    for t in plan.timesteps:
        for layer, shape in plan.layer_shapes.items():
            # Activation-like: a per-channel offset, heavy tails, and one constant channel.
            maps = rng.standard_t(4, size=(stop - start, *shape)) * 3 + rng.normal(size=(1, shape[0], 1, 1))
            maps[:, 0] = 2.5
            arrays[feature_path(t, layer)] = maps.astype(np.float16)
            arrays[pooled_path(t, layer)] = maps.astype(np.float32).mean(axis=(2, 3))
    return arrays


def write(path, encoding: str) -> dict:
    plan = CachePlan(**{**PLAN.__dict__, "map_encoding": encoding})
    writer = CacheWriter.create(str(path), REQUEST, plan)
    shards = {s: exact_shard(plan, s) for s in range(plan.num_shards)}
    for s, arrays in shards.items():
        writer.write_shard(s, arrays)
    return {name: np.concatenate([shards[s][name] for s in shards]) for name in shards[0]}


def reference_bitround(x: np.ndarray, keep: int) -> np.ndarray:
    """Round to nearest (ties to even) on a grid of 2^(e - keep), computed in float64."""
    v = x.astype(np.float64)
    step = 2.0 ** (np.floor(np.log2(np.abs(v))) - keep)
    return (np.rint(v / step) * step).astype(np.float16)


@pytest.mark.parametrize("keep", range(1, MANTISSA_BITS))
def test_bitround_keeps_k_bits_rounded_to_nearest_and_zeroes_the_rest(keep):
    rng = np.random.default_rng(keep)
    x = (rng.normal(size=20000) * 10.0 ** rng.uniform(-3, 3, 20000)).astype(np.float16)
    x = x[np.abs(x) >= np.finfo(np.float16).smallest_normal]
    out = bitround(x, keep)
    assert out.dtype == np.float16
    assert not np.any(out.view(np.uint16) & np.uint16((1 << (MANTISSA_BITS - keep)) - 1))
    np.testing.assert_array_equal(out, reference_bitround(x, keep))
    assert np.all(np.abs(out.astype(np.float64) - x) <= np.abs(x.astype(np.float64)) * 2.0 ** -(keep + 1))


def test_bitround_keeps_nan_and_inf_and_never_rounds_a_finite_value_to_inf():
    x = np.array([np.nan, np.inf, -np.inf, 65504, -65504, 0, -0.0], dtype=np.float16)
    out = bitround(x, 2)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf
    assert np.all(np.isfinite(out[3:])) and out[3] == 57344 and out[4] == -57344 and np.all(out[5:] == 0)


def test_uint8_decodes_a_constant_channel_exactly_and_the_rest_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6, 6)).astype(np.float16)
    x[1, 2] = np.float16(-7.123)
    q, scales = uint8_encode(x)
    assert q.dtype == np.uint8 and scales.shape == (3, 5, 2) and scales.dtype == np.float32
    assert scales[1, 2, 1] == 0 and np.all(q[1, 2] == 0)
    decoded = uint8_decode(q, scales)
    np.testing.assert_array_equal(decoded[1, 2], x[1, 2])
    step = scales[..., 1, None, None]
    fp16_rounding = np.abs(x.astype(np.float32)) * 2.0**-11
    assert np.all(np.abs(decoded.astype(np.float32) - x) <= step / 2 * 1.0001 + fp16_rounding)
    assert q.min() == 0 and q.max() == 255


@pytest.mark.parametrize("encoding", ["bitround-5", "uint8"])
def test_a_lossy_cache_decodes_within_the_error_it_recorded(tmp_path, encoding):
    exact = write(tmp_path / "c.zarr", encoding)
    errors = map_errors(open_cache(str(tmp_path / "c.zarr")))
    for direct in (True, False):  # the direct shard reader and zarr
        cache = open_cache(str(tmp_path / "c.zarr"), direct_reads=direct)
        feats = cache.features(range(10))
        for t in PLAN.timesteps:
            for layer in PLAN.layer_shapes:
                got = feats[t][layer].numpy()
                want = exact[feature_path(t, layer)]
                assert got.dtype == np.float16
                err = got.astype(np.float64) - want.astype(np.float64)
                recorded = errors["per_layer"][f"{t}/{layer}"]
                # The recorded numbers are those recomputed from the exact maps of the same images.
                assert recorded["max_abs"] == float(np.abs(err).max())
                assert math.isclose(recorded["rel_l2"], math.sqrt((err**2).sum() / (want.astype(np.float64) ** 2).sum()),
                                    rel_tol=1e-9)
                assert recorded["images"] == 10 and 0 < recorded["rel_l2"] < 0.02
    assert verify_cache(cache) == []


def test_the_stored_arrays_are_plain_zarr_with_their_decoding_described(tmp_path):
    write(tmp_path / "u.zarr", "uint8")
    write(tmp_path / "b.zarr", "bitround-6")
    root = zarr.open_group(str(tmp_path / "u.zarr"), mode="r")
    name = feature_path("t40", "up_blocks_3_conv2_2")
    array = root[name]
    assert array.dtype == np.uint8
    assert {k: array.attrs[k] for k in ("encoding", "decode", "scales")} == {
        "encoding": "uint8", "decode": "x = offset + scale * q", "scales": feature_scale_path("t40", "up_blocks_3_conv2_2")}
    scales = root[array.attrs["scales"]][:]
    by_hand = (scales[..., 0, None, None] + scales[..., 1, None, None] * array[:].astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(by_hand, open_cache(str(tmp_path / "u.zarr")).features(range(10))["t40"]["up_blocks_3_conv2_2"])
    rounded = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")[name]
    assert rounded.dtype == np.float16 and rounded.attrs["encoding"] == "bitround-6"
    assert "4 trailing mantissa bits zeroed" in rounded.attrs["decode"]
    assert not np.any(rounded[:].view(np.uint16) & np.uint16(0xF))


def test_cache_info_shows_tiers_encoding_bytes_per_tier_and_the_error(tmp_path):
    write(tmp_path / "c.zarr", "bitround-4")
    info = cache_info(open_cache(str(tmp_path / "c.zarr")))
    assert info["tiers"] == ["maps", "pooled"] and info["map_encoding"] == "bitround-4"
    assert set(info["bytes_per_image_by_tier"]) == {"maps", "pooled", "labels"}
    assert sum(info["bytes_per_image_by_tier"].values()) == pytest.approx(info["bytes_per_image"], abs=3)
    worst = info["map_error"]["worst"]
    assert worst["rel_l2"] == max(e["rel_l2"] for e in info["map_error"]["per_layer"].values())
    assert len(info["map_error"]["per_layer"]) == 4


def test_verify_catches_pooled_vectors_beyond_the_recorded_error(tmp_path):
    write(tmp_path / "c.zarr", "uint8")
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    pooled = root[pooled_path("t47", "up_blocks_1_attn1_0")]
    rows = pooled[4:8]
    rows[1, 3] += 1.0
    pooled[4:8] = rows
    problems = verify_cache(open_cache(str(tmp_path / "c.zarr")))
    assert len(problems) == 1 and problems[0].startswith("pooled/t47/up_blocks_1_attn1_0: shard 1 (rows 4-7): differs")


def test_encode_of_exact_maps_leaves_them_alone():
    x = np.ones((2, 3, 4, 4), dtype=np.float16)
    stored, scales, sums = encode("float16", x)
    assert stored is x and scales is None and sums is None
