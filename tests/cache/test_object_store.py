"""Caches on an S3-compatible object store: a moto server started here, on loopback only."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.cache.audit import verify_cache
from pipeline.cache.reader import open_cache
from pipeline.extract import Extraction


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
