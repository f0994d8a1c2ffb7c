import numpy as np

from pipeline.cache.layout import CachePlan, array_specs, shard_arrays

PLAN = CachePlan(num_samples=5, shard_size=2, timesteps=("t47", "t40"), layer_shapes={"a": (4, 2, 2), "b": (8, 1, 1)},
                 latent_shape=(4, 1, 1), label_shape=(), label_dtype="int64", map_encoding="uint8")


def _rows(n: int = 2) -> dict:
    shapes = PLAN.layer_shapes
    return {
        "labels": np.arange(n), "sample_names": np.array([f"s{i}" for i in range(n)], dtype=object),
        "latents": np.zeros((n, 4, 1, 1), np.float32),
        "trajectory": {t: np.full((n, 4, 1, 1), i, np.float32) for i, t in enumerate(PLAN.timesteps)},
        "features": {t: {l: np.full((n, *s), i, np.float16) for l, s in shapes.items()} for i, t in enumerate(PLAN.timesteps)},
        "pooled": {t: {l: np.full((n, s[0]), i, np.float32) for l, s in shapes.items()} for i, t in enumerate(PLAN.timesteps)},
    }


def test_a_write_supplies_every_array_of_the_layout_but_the_writers_own():
    arrays = shard_arrays(PLAN, _rows())
    own = [s.name for s in array_specs(PLAN) if s.name.startswith("feature_scales/") or s.name == "done"]
    assert list(arrays) == [s.name for s in array_specs(PLAN) if s.name not in own]
    assert own and "done" in own
    np.testing.assert_array_equal(arrays["features/t40/b"], np.ones((2, 8, 1, 1), np.float16))
    np.testing.assert_array_equal(arrays["pooled/t47/a"], np.zeros((2, 4), np.float32))
    np.testing.assert_array_equal(arrays["trajectory/t40"], np.ones((2, 4, 1, 1), np.float32))


def test_only_the_tiers_asked_for_and_the_parts_given_are_taken():
    assert list(shard_arrays(PLAN, _rows(), ("pooled",))) == ["pooled/t47/a", "pooled/t47/b", "pooled/t40/a", "pooled/t40/b"]
    rows = {k: v for k, v in _rows().items() if k in ("labels", "sample_names")}
    assert list(shard_arrays(PLAN, rows)) == ["labels", "sample_names"]
