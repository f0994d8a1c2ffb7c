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
    """The client, or one line naming the address and the timeout.

    ``Client(timeout=)`` alone does not bound the wait: a port that accepts connections and never
    answers (a stopped scheduler's port reused, a proxy) holds it forever, and a client left hanging
    in a thread keeps distributed's shared event loop busy, so a later ``LocalCluster`` in this
    process hangs too. The scheduler is therefore asked for its identity first, on an event loop of
    its own that is cancelled after ``timeout``; only a scheduler that answered gets a ``Client``.
    No client is made the default: dask's global scheduler setting is left as it was, and every
    computation here names its client."""
    from distributed import Client

    if cluster is not None:
        return Client(cluster, set_as_default=False)
    by_file = not spec.startswith(SCHEMES)
    what = f"scheduler file {spec}" if by_file else spec
    try:
        address = _address_in(spec) if by_file else spec
        _identify(address, timeout)
        kwargs = {"scheduler_file": spec} if by_file else {"address": spec}
        return Client(**kwargs, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError):
        raise SchedulerError(
            f"--scheduler {what}: no Dask scheduler answered within {timeout:g} s; check that the scheduler is "
            "running (`dask scheduler`), that the host and port are right and reachable from here, or raise "
            "--scheduler-timeout") from None
    except Exception as err:  # noqa: BLE001 - every other way of failing to connect becomes one line
        raise SchedulerError(f"--scheduler {what}: the connection failed ({type(err).__name__}: {first_line(err)}); "
                             "check that a Dask scheduler of a compatible `distributed` version listens there") from None


def _address_in(path: str) -> str:
    """The address a scheduler file (``dask scheduler --scheduler-file``) holds."""
    import json

    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if not (isinstance(info, dict) and isinstance(info.get("address"), str)):
        raise ValueError("it holds no scheduler address")
    return info["address"]


def _identify(address: str, timeout: float) -> None:
    """Ask the scheduler at ``address`` for its identity, or raise ``TimeoutError`` after ``timeout``.

    The loop runs in a thread of its own so that this works also where the caller already runs an
    event loop (a notebook); the thread always ends, since the loop cancels the exchange on time."""
    import asyncio

    from distributed.comm import connect as open_comm

    async def exchange():
        comm = await open_comm(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            reply = await comm.read()
        finally:
            comm.abort()
        if not (isinstance(reply, dict) and "Scheduler" in str(reply.get("type"))):
            raise ValueError(f"{address} answered, but not as a Dask scheduler")

    outcome: dict = {}

    def run():
        try:
            asyncio.run(asyncio.wait_for(exchange(), timeout))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="dask-identify", daemon=True)
    thread.start()
    thread.join()
    err = outcome.get("error")
    if isinstance(err, asyncio.TimeoutError):
        raise TimeoutError(address)
    if err is not None:
        raise err


__all__ = ["CONNECT_TIMEOUT", "LOCAL", "PROCESSES", "SchedulerError", "connect", "scheduler_problem"]
