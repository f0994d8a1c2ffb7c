import socket
import threading
import time

import dask
import distributed  # noqa: F401 - imported here, so that its import time is not part of the bounds below
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.cluster import SchedulerError, connect, scheduler_problem


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers, as a dead scheduler's reused port or a
    proxy would: ``Client(timeout=)`` alone waits on it forever."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def task_caches(tmp_path):
    import numpy as np

    from pipeline.synthetic import write_synthetic_cache

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        write_synthetic_cache(str(tmp_path / "task" / f"{split}.zarr"), rng.integers(0, 3, n), ("t47",),
                              {"up_blocks_1_attn1_0": (4, 2, 2)}, {("t47", "up_blocks_1_attn1_0"): 3.0},
                              num_classes=3, shard_size=8, split=split)
    return tmp_path / "task"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["silent", "closed"])
def test_an_unreachable_scheduler_is_one_line_within_the_timeout(address, silent_port):
    port = silent_port if address == "silent" else closed_port()
    start = time.monotonic()
    with pytest.raises(SchedulerError) as caught:
        with connect(f"tcp://127.0.0.1:{port}", timeout=1.5):
            pytest.fail("connected to no scheduler")
    assert time.monotonic() - start < 1.5 + 3
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dask-")]  # nothing left waiting
    assert dask.config.get("scheduler", None) is None  # dask's default scheduler untouched
    assert str(caught.value) == (
        f"--scheduler tcp://127.0.0.1:{port}: no Dask scheduler answered within 1.5 s; check that the scheduler is "
        "running (`dask scheduler`), that the host and port are right and reachable from here, or raise "
        "--scheduler-timeout")


def test_the_probe_command_prints_the_unreachable_address_in_one_line(silent_port, tmp_path, task_caches):
    start = time.monotonic()
    result = CliRunner().invoke(app, ["probe", "--cache-dir", str(task_caches.parent), "--dataset", task_caches.name,
                                      "--out", str(tmp_path / "p"),
                                      "--scheduler", f"tcp://127.0.0.1:{silent_port}", "--scheduler-timeout", "1"])
    assert result.exit_code == 2, result.output
    assert time.monotonic() - start < 1 + 3 + 10  # the timeout, the thread's margin, the import of distributed
    lines = result.output.strip().splitlines()
    assert lines == [f"error: --scheduler tcp://127.0.0.1:{silent_port}: no Dask scheduler answered within 1 s; check "
                     "that the scheduler is running (`dask scheduler`), that the host and port are right and reachable "
                     "from here, or raise --scheduler-timeout"]
    assert not (tmp_path / "p" / "probe_map.json").exists()


@pytest.mark.parametrize("spec", ["threads", "127.0.0.1:8786", "no-such-file.json", ""])
def test_a_scheduler_that_names_nothing_is_refused_before_anything_starts(spec):
    assert "is not local, processes, a scheduler address (tcp://HOST:PORT) or an existing scheduler file" in \
        scheduler_problem(spec)
    with pytest.raises(SchedulerError, match="is not local, processes"):
        with connect(spec):
            pass


def test_a_scheduler_file_that_is_no_scheduler_file_is_one_line(tmp_path):
    bad = tmp_path / "scheduler.json"
    bad.write_text("not json")
    with pytest.raises(SchedulerError, match=rf"--scheduler scheduler file {bad}: the connection failed \("):
        with connect(str(bad), timeout=2):
            pass


def test_a_local_scheduler_runs_tasks_in_threads_of_this_process():
    import os

    with connect("local", workers=2) as client:
        info = client.scheduler_info()["workers"]
        assert len(info) == 1 and next(iter(info.values()))["nthreads"] == 2
        assert client.submit(os.getpid).result() == os.getpid()
        assert dask.config.get("scheduler", None) is None  # the client is not made dask's default
    assert dask.config.get("scheduler", None) is None


def test_a_local_scheduler_starts_after_an_unanswered_address(silent_port):
    with pytest.raises(SchedulerError):
        with connect(f"tcp://127.0.0.1:{silent_port}", timeout=1):
            pass
    with connect("local", workers=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3


def test_a_running_scheduler_is_reached_by_address_and_by_scheduler_file(tmp_path):
    import json

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None) as cluster:
        file = tmp_path / "scheduler.json"
        file.write_text(json.dumps({"address": cluster.scheduler_address}))
        for spec in (cluster.scheduler_address, str(file)):
            with connect(spec, timeout=5) as client:
                assert client.scheduler.address == cluster.scheduler_address
                assert client.submit(sum, [1, 2]).result() == 3
    assert dask.config.get("scheduler", None) is None


def test_a_cluster_started_here_leaves_the_environment_as_it_was(monkeypatch):
    import os

    from pipeline.cluster import connect

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    with connect("processes", workers=1) as client:
        assert client.submit(lambda: os.environ.get("OMP_NUM_THREADS")).result() == "1"  # the workers' own
    assert dict(os.environ) == before
