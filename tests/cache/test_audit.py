
import pytest

from pipeline.cache.audit import cache_info, verify_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import CacheWriter
from tests.cache.fake_cache import REQUEST, _shard_file, build


def test_verify_passes_on_a_sound_cache_and_info_counts_bytes(tmp_path):
    build(tmp_path / "c.zarr")
    cache = open_cache(str(tmp_path / "c.zarr"))
    assert verify_cache(cache) == []
    info = cache_info(cache)
    raw = 10 * 2 * (8 * 4 * 4 + 4 * 8 * 8) * 2
    assert info["feature_bytes_raw_fp16"] == raw and info["num_samples"] == 10 and info["done"] == 10
    assert 0 < info["feature_bytes_on_disk"]
    assert info["compression_ratio"] == pytest.approx(raw / info["feature_bytes_on_disk"], rel=1e-2)


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
