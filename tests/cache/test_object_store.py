"""Caches on an S3-compatible object store: a moto server started here, on loopback only."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.cache.audit import verify_cache
from pipeline.cache.lock import CacheLocked, WriterLock
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from pipeline.extract.run import Extraction


@pytest.fixture(scope="module")
def s3_server():
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="caches")
    yield url
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint as a user sets them; s3fs (through botocore) reads them."""
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return s3_server


# Two layers keep the number of objects, and so the test, small.
FEW = {"layer_idxs": {"up_blocks": {"attn1": [[1, 0]], "conv2": [[3, 2]]}}}


def all_arrays(cache) -> dict:
    import zarr

    return {name: node[...] for name, node in cache.root.members(max_depth=None) if isinstance(node, zarr.Array)}


def test_extract_into_s3_equals_the_local_store(make_config, s3_server, tmp_path):
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    local = Extraction(make_config(cache_dir=str(tmp_path / "local"), **FEW)).run("test", progress=False)
    remote = Extraction(make_config(cache_dir="s3://caches/run1", **FEW), storage_options=opts).run("test", progress=False)
    assert remote.path == "s3://caches/run1/demo-landcover/test.zarr" and remote.extracted == 8
    a, b = open_cache(local.path), open_cache(remote.path, opts)
    assert b.complete and b.request == a.request and b.sample_names == a.sample_names
    arrays_a, arrays_b = all_arrays(a), all_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b) and len(arrays_a) == 3 * 2 * 2 + 3 + 4
    for name, value in arrays_a.items():
        np.testing.assert_array_equal(arrays_b[name], value, err_msg=name)
    assert verify_cache(b) == []
    # A second run finds the remote cache complete and extracts nothing.
    again = Extraction(make_config(cache_dir="s3://caches/run1", **FEW), storage_options=opts).run("test", progress=False)
    assert again.extracted == 0


def test_verify_catches_a_missing_shard_in_the_bucket(make_config, s3_env):
    import s3fs

    result = Extraction(make_config(cache_dir="s3://caches/run2", **FEW)).run("test", progress=False)
    runner = CliRunner()
    ok = runner.invoke(app, ["cache", "verify", result.path])
    assert ok.exit_code == 0 and ok.output.strip().endswith(": ok"), ok.output
    fs = s3fs.S3FileSystem()
    shard = "caches/run2/demo-landcover/test.zarr/features/t45/up_blocks_3_conv2_2/c/1/0/0/0"
    assert fs.exists(shard)
    fs.rm(shard)
    bad = runner.invoke(app, ["cache", "verify", result.path])
    assert bad.exit_code != 0 and "features/t45/up_blocks_3_conv2_2" in bad.output


def test_a_missing_shard_in_the_bucket_is_an_error_and_extraction_redoes_it(make_config, s3_env):
    import s3fs

    cfg = make_config(cache_dir="s3://caches/run3", **FEW)
    path = Extraction(cfg).run("test", progress=False).path
    s3fs.S3FileSystem().rm("caches/run3/demo-landcover/test.zarr/features/t45/up_blocks_3_conv2_2/c/1/0/0/0")
    with pytest.raises(CacheError, match=r"array features/t45/up_blocks_3_conv2_2, rows 4-7: its stored object .* is missing"):
        open_cache(path).features([5], ["t45"])
    assert Extraction(cfg).run("test", progress=False).extracted == 4
    assert verify_cache(open_cache(path)) == []


def test_a_live_claim_in_the_bucket_refuses_a_second_writer_and_a_stale_one_is_taken_over(s3_env, caplog):
    import json
    import logging
    import time

    import s3fs

    fs = s3fs.S3FileSystem()
    other = {"pid": 4242, "host": "node-7", "since": "2026-12-01T08:00:00+00:00", "token": "theirs"}
    fs.pipe_file("caches/claims/train.zarr.lock", json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(CacheLocked, match=r"being written by another extraction \(pid 4242 on node-7, since "
                                          r"2026-12-01T08:00:00\+00:00; its claim .* was renewed 0 s ago\)"):
        with WriterLock("s3://caches/claims/train.zarr", settle=0.1):
            pass
    fs.pipe_file("caches/claims/train.zarr.lock", json.dumps({**other, "heartbeat": time.time() - 600}).encode())
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.lock"):
        with WriterLock("s3://caches/claims/train.zarr", settle=0.1) as lock:
            assert json.loads(fs.cat_file("caches/claims/train.zarr.lock"))["token"] == lock.holder["token"]
            lock.check()
            # Another writer takes the claim over: the holder notices before its next shard.
            fs.pipe_file("caches/claims/train.zarr.lock", json.dumps({**other, "heartbeat": time.time()}).encode())
            with pytest.raises(CacheLocked, match="took the claim .* over; stopping"):
                lock.check()
    assert "taking over the stale claim of pid 4242 on node-7" in caplog.text
    assert fs.exists("caches/claims/train.zarr.lock")  # the other writer's claim is left to it


def test_unknown_protocols_memory_and_missing_credentials_are_named(make_config, s3_server, monkeypatch):
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3fs.S3FileSystem.clear_instance_cache()  # a new process: no filesystem made with the other tests' credentials
    with pytest.raises(CacheError, match="unknown protocol 'nosuch'; use a folder or an fsspec URL"):
        Extraction(make_config(cache_dir="nosuch://x")).run("test", progress=False)
    with pytest.raises(CacheError, match="memory:// is gone when the process ends"):
        Extraction(make_config(cache_dir="memory://x")).run("test", progress=False)
    with pytest.raises(CacheError, match=r"cannot open s3://caches/run1/demo-landcover/test.zarr: no credentials for s3://"):
        open_cache("s3://caches/run1/demo-landcover/test.zarr")
    s3fs.S3FileSystem.clear_instance_cache()
