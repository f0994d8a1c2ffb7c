
import pytest

from pipeline.cache.audit import verify_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.store import CacheError
from tests.cache.fake_cache import build


def test_file_url_store(tmp_path):
    url = (tmp_path / "c.zarr").as_uri()
    build(url)
    cache = open_cache(url)
    assert cache.complete and verify_cache(cache) == []


def test_an_unknown_protocol_is_named_not_taken_for_a_missing_cache():
    with pytest.raises(CacheError, match="cache location nosuch://bucket/c.zarr: unknown protocol 'nosuch'"):
        open_cache("nosuch://bucket/c.zarr")
