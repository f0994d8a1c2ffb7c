"""One writer per cache: a claim an extraction holds while it writes a store.

Two writers in one store lose data (parallel writes into one shard drop regions) and corrupt its
provenance, so a second extraction is refused with the first one named, or waits with ``wait``.

- A local store is claimed with ``flock`` on ``<store>.lock`` beside it. The kernel releases the
  lock when its process dies, ``kill -9`` included, so a lock is never stale; the file names its
  holder (pid, host, start) for the message a second writer gets, and a file left by a dead holder
  is taken over with a warning.
- An object store has no such lock, so the claim is an object ``<store>.lock`` with the holder and
  a heartbeat the holder refreshes every ``stale_seconds / 4``; a claim whose heartbeat is older
  than ``stale_seconds`` is taken over with a warning. With no atomic create-if-absent, a writer
  reads its claim back after ``settle`` seconds and starts only if it is still its own, and the
  writer checks the claim before each shard (``check``), so a writer that lost it stops.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid

from .store import CacheError, is_url

log = logging.getLogger(__name__)

STALE_SECONDS = 120.0
SETTLE_SECONDS = 1.0


class CacheLocked(CacheError):
    """Another live extraction is writing the store."""


def lock_path(path: str) -> str:
    return str(path).rstrip("/") + ".lock"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"


class WriterLock:
    """``with WriterLock(path): ...`` holds the store's claim for the block."""

    def __init__(self, path: str, storage_options: dict | None = None, wait: bool = False,
                 stale_seconds: float = STALE_SECONDS, settle: float = SETTLE_SECONDS):
        self.path, self.wait = str(path), wait
        self.stale_seconds, self.settle = stale_seconds, settle
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "token": uuid.uuid4().hex}
        # A file:// URL is a local path: it must take the same flock as the plain path does.
        self._local = urllib.parse.urlparse(self.path).path if self.path.startswith("file://") else self.path
        self._remote = _RemoteClaim(self, storage_options) if is_url(self._local) else None
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        if self._remote is not None:
            self._remote.acquire()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        if self._remote is not None:
            self._remote.release()
        elif self._fd is not None:
            try:
                os.unlink(lock_path(self._local))  # before unlocking: a waiter then locks a fresh file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def check(self) -> None:
        """Raise CacheLocked when another writer has taken the claim over (object stores)."""
        if self._remote is not None:
            self._remote.check()

    # --- local: flock --------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        name = lock_path(self._local)
        while True:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise CacheError(f"cannot write beside the cache {self.path} ({err.strerror}: {name}); "
                                 "extract into a writable folder (cache_dir)") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_local(fd)
                if not self.wait:
                    os.close(fd)
                    raise CacheLocked(f"cache {self.path} is being written by another extraction ({_describe(holder)}); "
                                      "let it finish, or pass --wait to start when it does") from None
                log.warning("waiting for the extraction writing %s (%s)", self.path, _describe(holder))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(name).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder we waited for removed that file: lock the current one
        left = _read_local(fd)
        if left:
            log.warning("taking over the lock of %s for %s: that process is gone", _describe(left), self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd


def _read_local(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}


class _RemoteClaim:
    """The claim object of a store on fsspec storage, with its heartbeat thread."""

    def __init__(self, lock: WriterLock, storage_options: dict | None):
        import fsspec

        self.lock = lock
        self.fs, root = fsspec.core.url_to_fs(lock.path, **(storage_options or {}))
        self.key = lock_path(root)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: dict | None = None

    def _read(self) -> dict | None:
        try:
            claim = json.loads(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: someone's, of unknown age
        return claim if isinstance(claim, dict) else {}

    def _write(self) -> None:
        self.fs.pipe_file(self.key, json.dumps({**self.lock.holder, "heartbeat": time.time()}).encode())

    def _stale(self, claim: dict) -> bool:
        """A claim not renewed for ``stale_seconds``; one with no heartbeat (an unreadable object, or
        the lock file of a local writer) counts as live: taking it over could make two writers."""
        beat = claim.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat > self.lock.stale_seconds

    def acquire(self) -> None:
        token = self.lock.holder["token"]
        while True:
            claim = self._read()
            if claim and claim.get("token") != token and not self._stale(claim):
                if not self.lock.wait:
                    beat = claim.get("heartbeat")
                    renewed = (f"was renewed {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float))
                               else "has no heartbeat: remove it if no extraction is running")
                    raise CacheLocked(f"cache {self.lock.path} is being written by another extraction "
                                      f"({_describe(claim)}; its claim {self.key} {renewed}); let it finish, or pass "
                                      "--wait to start when it does")
                time.sleep(min(5.0, self.lock.stale_seconds / 4))
                continue
            if claim and claim.get("token") != token:
                log.warning("taking over the stale claim of %s for %s (no heartbeat for over %.0f s)",
                            _describe(claim), self.lock.path, self.lock.stale_seconds)
            self._write()
            time.sleep(self.lock.settle)  # a writer racing for the same claim lands its own meanwhile
            back = self._read()
            if back and back.get("token") == token:
                break
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lock.stale_seconds / 4):
            try:
                claim = self._read()
                if not claim or claim.get("token") != self.lock.holder["token"]:
                    self.lost = claim or {}
                    return
                self._write()
            except Exception as err:  # a claim that cannot be renewed will be taken over: stop writing
                self.lost = {"host": f"unknown (the claim could not be renewed: {type(err).__name__})"}
                return

    def check(self) -> None:
        if self.lost is None:
            claim = self._read()
            if not claim or claim.get("token") != self.lock.holder["token"]:
                self.lost = claim or {}
        if self.lost is not None:
            raise CacheLocked(f"cache {self.lock.path}: another extraction ({_describe(self.lost)}) took the claim "
                              f"{self.key} over; stopping so that the two do not write the same shards")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        claim = self._read()
        if claim and claim.get("token") == self.lock.holder["token"]:
            self.fs.rm_file(self.key)
