"""The Dask scheduler a probe map runs on: one started here, or a running one reached by address.

``local`` is a ``distributed.LocalCluster`` of threads in this process (one worker, ``n_jobs``
threads), ``processes`` one of ``n_jobs`` worker processes with one thread each, and
``tcp://HOST:PORT`` (or ``tls://``, ``ws://``, ``wss://``) a scheduler already running, as
``dask scheduler`` or ``dask-jobqueue`` start one; a path to an existing file is read as the
scheduler file ``dask scheduler --scheduler-file`` writes. All three go through a
``distributed.Client``, so the probe map takes one code path on every scheduler.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from .errors import UserError, first_line

LOCAL, PROCESSES = "local", "processes"
SCHEMES = ("tcp://", "tls://", "ws://", "wss://")
CONNECT_TIMEOUT = 10.0  # seconds; the default of --scheduler-timeout


class SchedulerError(UserError):
    """A scheduler that cannot be named, started or reached."""


def scheduler_problem(spec) -> str | None:
    """Why ``spec`` names no scheduler, or None when it names one."""
    if spec in (LOCAL, PROCESSES) or (isinstance(spec, str) and spec.startswith(SCHEMES)):
        return None
    if isinstance(spec, str) and os.path.isfile(spec):
        return None
    return (f"--scheduler {spec!r} is not local, processes, a scheduler address (tcp://HOST:PORT) or an existing "
            "scheduler file; pass one of those")


@contextmanager
def connect(spec: str, workers: int = 2, timeout: float = CONNECT_TIMEOUT):
    """A ``distributed.Client`` on the scheduler ``spec``, closed (with any cluster started here) on exit."""
    problem = scheduler_problem(spec)
    if problem:
        raise SchedulerError(problem)
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
        raise SchedulerError(f"--scheduler-timeout {timeout!r} must be a positive number of seconds")
    # distributed's nanny sets OMP_NUM_THREADS=1 and the like in this process's environment for the
    # workers it spawns and leaves them there: every later subprocess would run its kernels on one
    # thread (and round float32 differently). The environment is put back once the cluster is closed.
    environ = dict(os.environ)
    cluster = _start(spec, workers) if spec in (LOCAL, PROCESSES) else None
    try:
        client = _reach(spec, cluster, timeout)
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
        os.environ.clear()
        os.environ.update(environ)


def _start(spec: str, workers: int):
    from distributed import LocalCluster

    if spec == LOCAL:
        return LocalCluster(n_workers=1, threads_per_worker=workers, processes=False, dashboard_address=None)
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def _reach(spec: str, cluster, timeout: float):
    """The client, or one line naming the address and the timeout. ``Client(timeout=)`` alone does
    not bound the wait: a port that accepts connections and never answers (a stopped scheduler's
    port reused, a proxy) holds it forever, so the connection is made in a thread that is given up
    on after ``timeout`` (it is a daemon: it does not keep the process alive)."""
    from distributed import Client

    if cluster is not None:
        return Client(cluster)
    kwargs = {"scheduler_file": spec} if not spec.startswith(SCHEMES) else {"address": spec}
    outcome: dict = {}

    def attempt():
        try:
            outcome["client"] = Client(**kwargs, timeout=timeout)
        except Exception as err:  # noqa: BLE001 - every way of failing to connect becomes one line below
            outcome["error"] = err

    thread = threading.Thread(target=attempt, name="dask-connect", daemon=True)
    thread.start()
    thread.join(timeout + 2)  # Client's own timeout, plus its start-up
    if "client" in outcome:
        return outcome["client"]
    what = f"scheduler file {spec}" if "scheduler_file" in kwargs else spec
    err = outcome.get("error")
    if err is None or isinstance(err, (OSError, TimeoutError)):
        raise SchedulerError(
            f"--scheduler {what}: no Dask scheduler answered within {timeout:g} s; check that the scheduler is "
            "running (`dask scheduler`), that the host and port are right and reachable from here, or raise "
            "--scheduler-timeout")
    raise SchedulerError(f"--scheduler {what}: the connection failed ({type(err).__name__}: {first_line(err)}); "
                         "check that a Dask scheduler of a compatible `distributed` version listens there")


__all__ = ["CONNECT_TIMEOUT", "LOCAL", "PROCESSES", "SchedulerError", "connect", "scheduler_problem"]
