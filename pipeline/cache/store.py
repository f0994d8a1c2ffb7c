"""Opening Zarr stores on a local path or an fsspec URL, and comparing provenance."""

from __future__ import annotations

import json
import os
import warnings

import zarr

from ..errors import UserError

# zarr encodes the inner chunks of a shard in batches of this size; its default of 1 doubles the
# time to write and read a cache of one-image chunks (measured: 42 -> 22 ms per 64-image shard).
# zarr also skips chunks equal to the fill value (a shard of class-0 labels, say); a cache stores
# them all, so that `cache verify` can tell a missing shard file from an empty one.
zarr.config.set({"codec_pipeline.batch_size": 64, "array.write_empty_chunks": True})


class CacheError(UserError):
    """A cache that cannot be used as asked; the message says why and what to do."""


class CacheMismatch(CacheError):
    """A cache built for another request; ``diffs`` lists the differing keys, both sides shown."""

    def __init__(self, path: str, diffs: list[str], fix: str):
        self.path, self.diffs = path, diffs
        super().__init__(mismatch_message(path, diffs, fix))


def is_url(path: str) -> bool:
    return "://" in str(path)


def protocol(path: str) -> str:
    return str(path).split("://", 1)[0] if is_url(path) else "file"


def check_location(path: str, writing: bool) -> None:
    """Refuse, before any work, a location that cannot hold a cache: an unknown protocol, or for
    writing ``memory://``, which lives only as long as the process that writes it."""
    import fsspec

    scheme = protocol(path)
    if scheme not in fsspec.available_protocols():
        raise CacheError(f"cache location {path}: unknown protocol {scheme!r}; use a folder or an fsspec URL "
                         "such as s3://bucket/caches or file:///data/caches")
    if writing and scheme == "memory":
        raise CacheError(f"cache location {path}: memory:// is gone when the process ends, so nothing could read "
                         "the cache; extract into a folder or an object store")


def _access_error(path: str, err: Exception) -> CacheError | None:
    """A one-line error for failures that are about credentials or permissions, not a missing cache."""
    name = type(err).__name__
    if "Credential" in name or "NoRegion" in name:
        return CacheError(f"cannot open {path}: no credentials for {protocol(path)}:// ({name}); set them as "
                          "the fsspec backend expects (for s3://: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, "
                          "for a server other than AWS, AWS_ENDPOINT_URL)")
    if isinstance(err, PermissionError):
        return CacheError(f"cannot open {path}: access denied ({err}); check the credentials and the "
                          "bucket's or folder's permissions")
    return None


def open_root(path: str, mode: str, storage_options: dict | None = None):
    """The root group of a store; ``file://`` and object-store URLs go through fsspec.

    Consolidated metadata is never used here: a group opened with it does not see arrays created
    after it was written (a fill's, say), so this code reads each array's own metadata, which is
    always current. It is written for other tools only (``consolidate``)."""
    kwargs = {}
    if is_url(path):
        check_location(path, writing=False)
        opts = dict(storage_options or {})
        if str(path).startswith("file://"):
            opts.setdefault("auto_mkdir", True)
        kwargs["storage_options"] = opts
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False, **kwargs)
    except ImportError as err:
        raise CacheError(f"cannot open {path}: {err}; install the fsspec package for {protocol(path)}:// "
                         f"(e.g. pip install s3fs for s3://)") from None
    except Exception as err:
        access = _access_error(path, err)
        if access is not None:
            raise access from None
        raise


def consolidate(root) -> None:
    """Copy every array's metadata into the root's zarr.json, so that xarray and other tools open the
    store with one read. Only a finished store is consolidated; its writers drop the copy before they
    change what it lists (``unconsolidate``)."""
    with warnings.catch_warnings():  # zarr warns that Zarr v3 does not specify it yet: we know
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(root.store, root.path or None, zarr_format=3)


def unconsolidate(root) -> None:
    """Drop the consolidated metadata of ``root`` (opened by ``open_root``) before arrays are created
    or deleted, so that no tool reads a stale list of them: the root's zarr.json is rewritten from
    the group as opened, which holds its attributes and not the copy."""
    root.attrs.put(dict(root.attrs))


class ChunkPresence:
    """Which stored objects (shard files, chunks) a store holds, asked one key at a time.

    A Zarr read of a missing chunk, or of an empty shard file, returns the fill value, so a deleted
    or emptied shard would read as zeros; readers ask here first, and an object of 0 bytes counts
    as missing. A local store is asked with one ``stat`` per key; an fsspec store is listed once
    with sizes, which costs a few requests where a check per key would cost one each.
    """

    def __init__(self, store):
        from zarr.storage import FsspecStore, LocalStore

        self.store = store
        self.local_root = str(store.root) if isinstance(store, LocalStore) else None
        self._fsspec = isinstance(store, FsspecStore)
        self._sizes: dict[str, int] | None = None

    def has(self, key: str) -> bool:
        if self.local_root is not None:
            try:
                return os.stat(os.path.join(self.local_root, key)).st_size > 0
            except FileNotFoundError:
                return False
        if self._sizes is None:
            self._sizes = _object_sizes(self.store, self._fsspec)
        return self._sizes.get(key, 0) > 0


def _object_sizes(store, fsspec_store: bool) -> dict[str, int]:
    """Every key of a store with its size in bytes."""
    from zarr.core.sync import sync

    if fsspec_store:  # one listing with sizes; the store's filesystem is an asynchronous one
        root = store.path.rstrip("/")

        async def listing():
            return await store.fs._find(root, detail=True)

        return {name[len(root) + 1:]: int(info.get("size") or 0) for name, info in sync(listing()).items()}

    async def collect():
        return {key: await store.getsize(key) async for key in store.list()}

    return sync(collect())


def path_exists(path: str, storage_options: dict | None = None) -> bool:
    """Whether anything (a cache or not) is at ``path``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return fs.exists(root)


def remove(path: str, storage_options: dict | None = None) -> None:
    """Delete a whole store (``--overwrite``)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def normalise(value):
    """What a value looks like after a trip through the store's JSON attributes."""
    return json.loads(json.dumps(value))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differences(stored: dict, requested: dict) -> list[str]:
    """Dotted keys whose values differ, each as 'key: cache X, requested Y'."""
    a, b = flatten(normalise(stored)), flatten(normalise(requested))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: cache {a.get(key, '<absent>')!r}, requested {b.get(key, '<absent>')!r}")
    return out


def mismatch_message(path: str, diffs: list[str], fix: str) -> str:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    return f"cache {path} was built with other settings ({shown}); {fix}"


class DamagedData(CacheError):
    """Data a cache claims (its shard is done) and cannot give: missing or failing its checksum."""

    def __init__(self, cache: str, array: str, rows: tuple[int, int], what: str):
        self.cache, self.array, self.rows, self.what = cache, array, rows, what
        where = f"row {rows[0]}" if rows[1] - rows[0] == 1 else f"rows {rows[0]}-{rows[1] - 1}"
        super().__init__(f"cache {cache}: array {array}, {where}: {what}; run `satdifuser cache "
                         f"verify {cache}`, then `satdifuser extract CONFIG --split SPLIT --repair` re-extracts what "
                         "it names")
