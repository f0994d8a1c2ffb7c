import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cache.lock import CacheLocked, WriterLock, lock_path
from pipeline.cache.store import CacheError

HOLD = """
import sys, time
from pipeline.cache.lock import WriterLock
with WriterLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    last = time.time()  # the last moment it surely holds the lock (taken after the release, a busy
    # machine could delay the clock reading past another process's acquisition)
print(last, flush=True)
"""


def holder(path, seconds: float) -> subprocess.Popen:
    """Another process holding the store's lock for ``seconds``; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_first_named(tmp_path):
    path = tmp_path / "train.zarr"
    first = holder(path, 60)
    try:
        with pytest.raises(CacheLocked) as err:
            with WriterLock(str(path)):
                pass
        message = str(err.value)
        assert message.startswith(f"cache {path} is being written by another extraction (pid {first.pid} on "
                                  f"{socket.gethostname()}, since ") and "pass --wait" in message
    finally:
        first.kill()
        first.wait()


def test_wait_starts_when_the_first_writer_is_done(tmp_path):
    path = tmp_path / "train.zarr"
    first = holder(path, 1.5)
    with WriterLock(str(path), wait=True):
        acquired = time.time()
        assert Path(lock_path(str(path))).read_text().count(f'"pid": {os.getpid()}') == 1
    last_held = float(first.communicate()[0])
    assert last_held <= acquired  # the two never held it at once
    assert not Path(lock_path(str(path))).exists()  # released and removed


def test_the_lock_of_a_killed_writer_is_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / "train.zarr"
    dead = holder(path, 60)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert Path(lock_path(str(path))).exists()  # left behind by kill -9
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.lock"):
        with WriterLock(str(path)):
            pass
    assert f"taking over the lock of pid {dead.pid} on {socket.gethostname()}" in caplog.text
    assert "that process is gone" in caplog.text


def test_a_folder_that_cannot_be_written_is_named(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder):
        with pytest.raises(CacheError, match=r"cannot write beside the cache .*train.zarr .*extract into a writable"):
            with WriterLock(str(folder / "train.zarr")):
                pass


def test_two_extractions_with_one_config_do_the_work_once(write_exp, tmp_path):
    from pipeline.cache.reader import open_cache
    from pipeline.config import load_config
    from pipeline.extract.run import Extraction

    exp = write_exp(layer_idxs={"up_blocks": {"attn1": [[1, 0]]}})
    cfg = load_config(exp)
    path = cfg.cache_path("train")
    first = subprocess.Popen([sys.executable, "-m", "cli", "extract", str(exp), "--split", "train", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not Path(lock_path(path)).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = Extraction(cfg).run("train", wait=True, progress=False)
    out, err = first.communicate()
    assert first.returncode == 0, err
    assert "20 extracted" in out and second.extracted == 0
    assert open_cache(path).attrs["ledger"]["images_extracted"] == 20


def test_a_file_url_takes_the_same_lock_as_the_plain_path(tmp_path):
    path = tmp_path / "train.zarr"
    first = holder(path, 60)
    try:
        with pytest.raises(CacheLocked, match=f"pid {first.pid} on "):
            with WriterLock(path.as_uri()):
                pass
    finally:
        first.kill()
        first.wait()
