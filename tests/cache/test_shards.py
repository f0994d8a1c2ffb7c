import numpy as np
import pytest
import zarr

import pipeline.cache.reader as reader_module
from pipeline.cache.layout import CODECS, compressors, feature_path
from pipeline.cache.reader import open_cache
from pipeline.cache.shards import ShardReader
from pipeline.cache.store import CacheError
from pipeline.synthetic import write_synthetic_cache

SHAPES = {"up_blocks_1_attn1_0": (8, 4, 4), "up_blocks_3_conv2_2": (4, 8, 8)}
TIMESTEPS = ("t47", "t40")


def synthetic(path, codec="blosc-lz4", n=11, shard_size=4):
    write_synthetic_cache(str(path), np.arange(n) % 3, TIMESTEPS, SHAPES, shard_size=shard_size, codec=codec)
    return open_cache(str(path))


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_direct_reads_equal_zarr_reads_for_every_codec(tmp_path, codec):
    cache = synthetic(tmp_path / "c.zarr", codec)  # 11 images in shards of 4: the last shard is partial
    rng = np.random.default_rng(0)
    selections = [np.arange(11), np.sort(rng.permutation(11)[:5]), rng.permutation(11)[:6], np.array([10]),
                  np.arange(4, 8), np.array([], dtype=np.int64)]
    for t in TIMESTEPS:
        for layer in SHAPES:
            array = cache.root[feature_path(t, layer)]
            reader = ShardReader.for_array(array)
            assert reader is not None
            whole = array[:]
            for rows in selections:
                got = reader.read(rows)
                assert got.dtype == np.float16 and got.shape == (len(rows), *SHAPES[layer])
                np.testing.assert_array_equal(got, whole[rows])


def test_features_are_the_same_with_and_without_direct_reads(tmp_path, monkeypatch):
    synthetic(tmp_path / "c.zarr")
    rows = [9, 0, 5, 6, 7]
    monkeypatch.setattr(reader_module, "PARALLEL_BYTES", 0)  # threads even for these tiny maps
    monkeypatch.setattr(reader_module, "READ_THREADS", 4)
    direct = open_cache(str(tmp_path / "c.zarr")).features(rows)
    through_zarr = open_cache(str(tmp_path / "c.zarr"), direct_reads=False).features(rows)
    monkeypatch.setattr(reader_module, "READ_THREADS", 1)
    serial = open_cache(str(tmp_path / "c.zarr")).features(rows)
    for t in TIMESTEPS:
        for layer in SHAPES:
            np.testing.assert_array_equal(direct[t][layer].numpy(), through_zarr[t][layer].numpy())
            np.testing.assert_array_equal(serial[t][layer].numpy(), through_zarr[t][layer].numpy())


def _shard_file(root, shard, t="t47", layer="up_blocks_3_conv2_2"):
    return root / "features" / t / layer / "c" / str(shard) / "0" / "0" / "0"


def test_a_corrupted_chunk_is_refused_with_the_array_named(tmp_path):
    root = tmp_path / "c.zarr"
    cache = synthetic(root)
    f = _shard_file(root, 1)
    data = bytearray(f.read_bytes())
    data[40] ^= 0xFF  # inside the shard's first chunk
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"array features/t47/up_blocks_3_conv2_2, rows 4-7: the chunk of row 4 fails its "
                                         r"checksum; run `satdifuser cache verify .*--repair"):
        cache.features([4], layers=["up_blocks_3_conv2_2"])
    # Rows of other shards still read.
    assert cache.features([0], layers=["up_blocks_3_conv2_2"])["t47"]["up_blocks_3_conv2_2"].shape == (1, 4, 8, 8)


def test_a_corrupted_shard_index_is_refused(tmp_path):
    root = tmp_path / "c.zarr"
    cache = synthetic(root)
    f = _shard_file(root, 0)
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="rows 0-3: its index fails its checksum"):
        cache.features([1], layers=["up_blocks_3_conv2_2"])


def test_a_truncated_shard_is_refused(tmp_path):
    root = tmp_path / "c.zarr"
    cache = synthetic(root)
    f = _shard_file(root, 2)
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CacheError, match="rows 8-10: its index fails its checksum"):
        cache.features([9], layers=["up_blocks_3_conv2_2"])


def test_chunks_never_written_are_refused_not_read_as_the_fill_value(tmp_path):
    with zarr.config.set({"array.write_empty_chunks": False}):
        array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 2, 3, 3), chunks=(1, 2, 3, 3),
                                  shards=(4, 2, 3, 3), dtype="float16", fill_value=0, compressors=compressors("blosc-zstd"))
        values = np.random.default_rng(0).normal(size=(8, 2, 3, 3)).astype(np.float16)
        values[1] = 0  # an all-zero chunk is not stored
        values[4:] = 0  # a shard with no file at all
        array[:] = values
    array = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")
    assert not _shard_file(tmp_path, 1).exists()
    reader = ShardReader.for_array(array)
    assert reader is not None
    np.testing.assert_array_equal(reader.read([0, 2, 3]), values[[0, 2, 3]])
    with pytest.raises(CacheError, match="array .*, row 1: its chunk was never written"):
        reader.read([0, 1])
    with pytest.raises(CacheError, match=r"rows 4-7: its shard file .*/c/1/0/0/0 is missing"):
        reader.read([5])


def test_a_deleted_shard_file_is_an_error_on_every_read_path(tmp_path):
    root = tmp_path / "c.zarr"
    synthetic(root)
    _shard_file(root, 1).unlink()
    (root / "pooled" / "t40" / "up_blocks_1_attn1_0" / "c" / "2" / "0").unlink()
    (root / "labels" / "c" / "0").unlink()
    for direct in (True, False):
        cache = open_cache(str(root), direct_reads=direct)
        with pytest.raises(CacheError, match=r"array features/t47/up_blocks_3_conv2_2, rows 4-7: .* is missing; run "
                                             r"`satdifuser cache verify"):
            cache.features([0, 5], layers=["up_blocks_3_conv2_2"])
        assert cache.features([0, 9], ["t47"], ["up_blocks_3_conv2_2"])["t47"]["up_blocks_3_conv2_2"].shape[0] == 2
        with pytest.raises(CacheError, match=r"array pooled/t40/up_blocks_1_attn1_0, rows 8-10: .*c/2/0 is missing"):
            cache.pooled([9], ["t40"], ["up_blocks_1_attn1_0"])
        with pytest.raises(CacheError, match=r"array labels, rows 0-3: its stored object labels/c/0 is missing"):
            cache.labels([2])


def test_other_layouts_and_stores_fall_back_to_zarr(tmp_path):
    local = zarr.create_array(str(tmp_path / "b.zarr"), shape=(8, 2, 3, 3), chunks=(2, 2, 3, 3), dtype="float16")
    assert ShardReader.for_array(local) is None  # two images per chunk
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 2, 3, 3), chunks=(1, 2, 3, 3),
                               shards=(4, 2, 3, 3), dtype="float16", compressors=compressors("blosc-lz4"))
    assert ShardReader.for_array(memory) is None  # not a local directory
    gzipped = zarr.create_array(str(tmp_path / "c.zarr"), shape=(8, 2, 3, 3), chunks=(1, 2, 3, 3), shards=(4, 2, 3, 3),
                                 dtype="float16", compressors=[zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec()])
    assert ShardReader.for_array(gzipped) is None  # a codec the cache never writes


def test_a_file_url_cache_reads_through_zarr(tmp_path):
    url = (tmp_path / "c.zarr").as_uri()
    write_synthetic_cache(url, np.arange(6) % 2, TIMESTEPS, SHAPES, shard_size=4)
    cache = open_cache(url)
    got = cache.features([5, 1])["t40"]["up_blocks_1_attn1_0"].numpy()
    np.testing.assert_array_equal(got, cache.root[feature_path("t40", "up_blocks_1_attn1_0")][:][[5, 1]])


def test_runs_of_rows_read_through_zarr_as_slices(tmp_path):
    synthetic(tmp_path / "c.zarr", n=22)
    rows = list(range(0, 8)) + list(range(12, 20))  # two runs: read as two slices
    direct = open_cache(str(tmp_path / "c.zarr")).features(rows)
    through_zarr = open_cache(str(tmp_path / "c.zarr"), direct_reads=False).features(rows)
    whole = open_cache(str(tmp_path / "c.zarr")).root[feature_path("t40", "up_blocks_3_conv2_2")][:]
    np.testing.assert_array_equal(through_zarr["t40"]["up_blocks_3_conv2_2"].numpy(), whole[rows])
    for t in TIMESTEPS:
        for layer in SHAPES:
            np.testing.assert_array_equal(direct[t][layer].numpy(), through_zarr[t][layer].numpy())


def test_short_reads_of_a_whole_shard_are_completed(tmp_path, monkeypatch):
    import pipeline.cache.shards as shards

    cache = synthetic(tmp_path / "c.zarr")
    real = shards.os.pread
    monkeypatch.setattr(shards.os, "pread", lambda fd, size, offset: real(fd, min(size, 1024), offset))
    array = cache.root[feature_path("t47", "up_blocks_3_conv2_2")]
    np.testing.assert_array_equal(ShardReader.for_array(array).read(np.arange(4)), array[:4])  # a whole shard


def test_no_layers_read_nothing(tmp_path):
    cache = synthetic(tmp_path / "c.zarr")
    assert cache.features([0, 1], layers=[]) == {"t47": {}, "t40": {}}
