import numpy as np
import pytest
import torch

from pipeline.cache.batches import CacheBatches, batch_order, shard_buffers
from pipeline.cache.reader import open_cache
from pipeline.cache.shards import ShardReader
from pipeline.synthetic import write_synthetic_cache

SHAPES = {"up_blocks_1_attn1_0": (8, 4, 4), "up_blocks_3_conv2_2": (4, 8, 8)}


def test_shard_buffers_cover_every_image_once_a_few_shards_at_a_time():
    groups = shard_buffers(np.arange(22), shard_size=4, buffer_shards=2, seed=1, epoch=0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(22))
    shard_sets = [set((g // 4).tolist()) for g in groups]
    assert [len(s) for s in shard_sets] == [2, 2, 2]  # 6 shards (the last of 2 images), 2 per group
    assert set().union(*shard_sets) == set(range(6))
    assert any(not np.array_equal(g, np.sort(g)) for g in groups)  # shuffled within a group
    again = shard_buffers(np.arange(22), 4, 2, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))  # seeded
    other = np.concatenate(shard_buffers(np.arange(22), 4, 2, seed=1, epoch=1))
    assert not np.array_equal(np.concatenate(groups), other)  # a new order each epoch


def test_shard_buffers_need_a_shard_size():
    with pytest.raises(ValueError, match="at least 1, not 0 and 2"):
        shard_buffers(np.arange(8), 0, 2, seed=0, epoch=0)


def test_shard_buffers_keep_to_a_subset():
    subset = np.array([1, 2, 9, 10, 11, 17])
    groups = shard_buffers(subset, shard_size=4, buffer_shards=1, seed=0, epoch=0)
    assert sorted(np.concatenate(groups).tolist()) == subset.tolist()
    assert sorted(len(g) for g in groups) == [1, 2, 3]  # shards 0, 2 and 4, one group each


def test_batch_order_with_buffers_follows_the_groups():
    batches = batch_order(np.arange(22), 5, True, seed=1, epoch=0, shard_size=4, buffer_shards=2)
    flat = np.concatenate(shard_buffers(np.arange(22), 4, 2, seed=1, epoch=0))
    assert [b.tolist() for b in batches] == [sorted(flat[i : i + 5].tolist()) for i in range(0, 22, 5)]
    full = batch_order(np.arange(22), 5, True, seed=1, epoch=0)  # default: the reference's permutation
    assert sorted(np.concatenate(full).tolist()) == list(range(22))


@pytest.fixture
def cache(tmp_path):
    write_synthetic_cache(str(tmp_path / "c.zarr"), np.arange(22) % 3, ("t47", "t40"), SHAPES, shard_size=4)
    return open_cache(str(tmp_path / "c.zarr"))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_buffered_epochs_give_the_batches_of_the_order(cache, prefetch):
    buffered = CacheBatches(cache, 5, shuffle=True, seed=2, prefetch=prefetch, buffer_shards=2)
    for epoch in (0, 1):
        got = list(buffered.epoch(epoch))
        want = [buffered.read(b) for b in buffered.order(epoch)]
        assert len(got) == len(want) == 5
        for (f0, l0, i0), (f1, l1, i1) in zip(got, want):
            assert np.array_equal(i0, i1) and torch.equal(l0, l1)
            for t in ("t47", "t40"):
                for layer in SHAPES:
                    assert torch.equal(f0[t][layer], f1[t][layer])
    preloaded = CacheBatches(cache, 5, shuffle=True, seed=2, buffer_shards=2, preload=True)
    assert [i.tolist() for _, _, i in preloaded.epoch(1)] == [b.tolist() for b in buffered.order(1)]


def test_buffered_epochs_read_whole_shards_once(cache, monkeypatch):
    reads = []
    original = ShardReader._read_shard

    def spy(self, shard, local, out, at):
        reads.append((self.name, shard, sorted(local.tolist())))
        return original(self, shard, local, out, at)

    monkeypatch.setattr(ShardReader, "_read_shard", spy)
    list(CacheBatches(cache, 5, layers=["up_blocks_3_conv2_2"], shuffle=True, seed=2, buffer_shards=2).epoch(0))
    for t in ("t47", "t40"):
        mine = [(shard, rows) for name, shard, rows in reads if name == f"features/{t}/up_blocks_3_conv2_2"]
        assert sorted(shard for shard, _ in mine) == list(range(6))  # each shard read once
        assert all(rows == list(range(4 if shard < 5 else 2)) for shard, rows in mine)  # and whole
    reads.clear()
    list(CacheBatches(cache, 5, layers=["up_blocks_3_conv2_2"], shuffle=True, seed=2).epoch(0))
    assert len(reads) > 12  # the full shuffle reads parts of shards, batch by batch


def test_preloading_holds_only_the_rows_it_serves(cache):
    rows = np.array([17, 2, 9, 3, 21])
    preloaded = CacheBatches(cache, 2, shuffle=True, seed=1, indices=rows, preload=True)
    streamed = CacheBatches(cache, 2, shuffle=True, seed=1, indices=rows)
    for (f0, l0, i0), (f1, l1, i1) in zip(preloaded.epoch(0), streamed.epoch(0), strict=True):
        assert np.array_equal(i0, i1) and torch.equal(l0, l1)
        for t in ("t47", "t40"):
            for layer in SHAPES:
                assert torch.equal(f0[t][layer], f1[t][layer])
    held, feats, labels = preloaded._memory
    assert held.tolist() == [2, 3, 9, 17, 21]
    assert len(labels) == 5 and all(len(x) == 5 for d in feats.values() for x in d.values())
    assert preloaded.nbytes() == 5 * 2 * (8 * 4 * 4 + 4 * 8 * 8) * 2


def test_batches_read_ahead_preload_and_shuffle_per_epoch(cached_demo):
    cache = open_cache(f"{cached_demo().cache_dir}/demo-landcover/train.zarr")
    plain = CacheBatches(cache, 6, ["t47"], ["up_blocks_3_conv2_2"], shuffle=True, seed=3, prefetch=0)
    ahead = CacheBatches(cache, 6, ["t47"], ["up_blocks_3_conv2_2"], shuffle=True, seed=3, prefetch=2)
    loaded = CacheBatches(cache, 6, ["t47"], ["up_blocks_3_conv2_2"], shuffle=True, seed=3, preload=True)
    runs = [list(b.epoch(1)) for b in (plain, ahead, loaded)]
    for batches in runs[1:]:
        for (f0, l0, i0), (f1, l1, i1) in zip(runs[0], batches):
            assert np.array_equal(i0, i1) and torch.equal(l0, l1)
            assert torch.equal(f0["t47"]["up_blocks_3_conv2_2"], f1["t47"]["up_blocks_3_conv2_2"])
    def order(e):
        return np.concatenate([i for _, _, i in plain.epoch(e)])

    assert sorted(order(0)) == list(range(20)) and not np.array_equal(order(0), order(1))
    assert np.array_equal(order(1), np.concatenate([i for _, _, i in runs[0]]))
