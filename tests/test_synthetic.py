import numpy as np
import pytest
import zarr

from pipeline.cache.audit import verify_cache
from pipeline.cache.layout import array_specs
from pipeline.cache.reader import open_cache
from pipeline.synthetic import write_synthetic_cache

SHAPES = {"a": (4, 4, 4), "b": (8, 2, 2)}


def _arrays_in(path) -> set[str]:
    root = zarr.open_group(str(path), mode="r")
    return {name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


@pytest.mark.parametrize("labels", [np.arange(10) % 3, (np.arange(24).reshape(6, 4) % 3 == 0).astype(np.uint8),
                                    np.arange(6 * 8 * 8).reshape(6, 8, 8) % 3],
                         ids=["classes", "multi-label", "masks"])
def test_a_synthetic_cache_passes_the_audit_and_holds_exactly_the_layouts_arrays(tmp_path, labels):
    path = tmp_path / "train.zarr"
    write_synthetic_cache(str(path), labels, ("t47", "t40"), SHAPES, signal={("t47", "a"): 2.0}, shard_size=4)
    cache = open_cache(str(path))
    assert verify_cache(cache) == []
    assert cache.complete and len(cache) == len(labels)
    assert _arrays_in(path) == {spec.name for spec in array_specs(cache.plan)}
    np.testing.assert_array_equal(cache.labels(np.arange(len(labels))).numpy(), labels)


def test_only_the_signal_cell_tells_the_classes_apart(tmp_path):
    labels = np.arange(60) % 3
    write_synthetic_cache(str(tmp_path / "c.zarr"), labels, ("t47",), SHAPES, signal={("t47", "a"): 3.0}, shard_size=16)
    pooled = open_cache(str(tmp_path / "c.zarr")).pooled(np.arange(60))["t47"]

    def nearest_mean_accuracy(x):
        means = np.stack([x[labels == k].mean(0) for k in range(3)])
        return float((np.linalg.norm(x[:, None] - means[None], axis=2).argmin(1) == labels).mean())

    assert nearest_mean_accuracy(pooled["a"].numpy()) == 1.0
    assert nearest_mean_accuracy(pooled["b"].numpy()) < 0.9


def test_a_seed_gives_the_same_cache_and_each_split_its_own_noise(tmp_path):
    labels = np.arange(8) % 2

    def maps(name, split):
        write_synthetic_cache(str(tmp_path / name), labels, ("t47",), SHAPES, seed=3, split=split, shard_size=4)
        return open_cache(str(tmp_path / name)).features(np.arange(8))["t47"]["a"].numpy()

    first = maps("a.zarr", "train")
    np.testing.assert_array_equal(first, maps("b.zarr", "train"))
    assert not np.array_equal(first, maps("c.zarr", "val"))
