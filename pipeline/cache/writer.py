"""Writing a cache one shard at a time, so a killed run resumes where it stopped."""

from __future__ import annotations

import datetime as dt

import numpy as np

from .layout import (
    ATTRS_KEY, FORMAT_VERSION, CachePlan, compressors, feature_path, pooled_path, trajectory_path,
)
from .store import CacheError, CacheMismatch, differences, normalise, open_root, path_exists, remove

CREATING_KEY = "satdifuser_creating"


class CacheWriter:
    """Creates or reopens a store for a request, and writes whole shards into it."""

    def __init__(self, root, path: str, plan: CachePlan):
        self.root = root
        self.path = path
        self.plan = plan

    @classmethod
    def reopen(cls, path: str, request: dict, storage_options: dict | None = None) -> "CacheWriter | None":
        """The store at ``path`` if it was built for ``request``; None if there is none.

        A cache built for another request is refused with the keys that differ (CacheMismatch);
        anything else at ``path`` is refused too, never deleted. A cache whose creation never
        finished counts as none.
        """
        if not path_exists(path, storage_options):
            return None
        not_ours = CacheError(f"{path} exists but is not a feature cache; move it away or pass --overwrite")
        try:
            root = open_root(path, "r+", storage_options)
        except CacheError:
            raise
        except Exception:  # zarr raises several kinds for "no group here"
            raise not_ours from None
        stored = root.attrs.get(ATTRS_KEY)
        if stored is None:
            if root.attrs.get(CREATING_KEY):
                return None
            raise not_ours
        if stored.get("format_version") != FORMAT_VERSION or not {"request", "plan"} <= set(stored):
            raise CacheError(
                f"cache {path} has format version {stored.get('format_version')}, this version writes "
                f"{FORMAT_VERSION}; pass --overwrite to rebuild it"
            )
        diffs = differences(stored["request"], request)
        if diffs:
            raise CacheMismatch(path, diffs, "pass --overwrite to rebuild it")
        return cls(root, path, CachePlan.from_attrs(stored["plan"]))

    @classmethod
    def create(cls, path: str, request: dict, plan: CachePlan, info: dict | None = None,
               storage_options: dict | None = None) -> "CacheWriter":
        """A new, empty store for ``request``, replacing whatever was at ``path``."""
        remove(path, storage_options)
        request = normalise(request)
        root = open_root(path, "w", storage_options)
        root.attrs[CREATING_KEY] = True
        _create_arrays(root, plan)
        # Provenance last: until then the store is known to be half-created.
        root.attrs[ATTRS_KEY] = {
            "format_version": FORMAT_VERSION,
            "request": request,
            "plan": plan.to_attrs(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **(info or {}),
        }
        del root.attrs[CREATING_KEY]
        return cls(root, path, plan)

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.plan.num_shards) if not self._shard_done(s)]

    def _shard_done(self, shard: int) -> bool:
        try:
            return bool(self.root["done"][slice(*self.plan.shard_range(shard))].all())
        except Exception:  # an unreadable done chunk means the shard must be redone
            return False

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array of one shard, then mark it done.

        ``arrays`` maps store paths (``features/t47/up_blocks_1_attn1_0``, ``latents``, ...) to the
        shard's rows; all must be present so a shard is never marked done half-written.
        """
        start, stop = self.plan.shard_range(shard)
        missing = sorted(set(self.array_paths()) - set(arrays))
        if missing:
            raise ValueError(f"shard {shard} lacks arrays {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for name, rows in arrays.items():
            if len(rows) != stop - start:
                raise ValueError(f"shard {shard} of {name} has {len(rows)} rows, expected {stop - start}")
        for name, rows in arrays.items():
            self.root[name][start:stop] = rows
        self.root["done"][start:stop] = True

    def array_paths(self) -> list[str]:
        plan = self.plan
        paths = ["latents", "labels", "sample_names"]
        for t in plan.timesteps:
            paths.append(trajectory_path(t))
            for layer in plan.layer_shapes:
                paths += [feature_path(t, layer), pooled_path(t, layer)]
        return paths

    def update_info(self, **values) -> None:
        attrs = dict(self.root.attrs[ATTRS_KEY])
        attrs.update(normalise(values))
        self.root.attrs[ATTRS_KEY] = attrs


def _create_arrays(root, plan: CachePlan) -> None:
    n, s = plan.num_samples, plan.shard_size
    codecs = compressors(plan.codec)

    def per_shard(name, shape, dtype):
        root.create_array(name, shape=(n, *shape), chunks=(s, *shape), dtype=dtype, compressors=codecs)

    for t in plan.timesteps:
        for layer, shape in plan.layer_shapes.items():
            # One chunk per image so a batch reads only its images; shards keep file counts low.
            root.create_array(
                feature_path(t, layer), shape=(n, *shape), chunks=(1, *shape), shards=(s, *shape),
                dtype="float16", compressors=codecs,
            )
            per_shard(pooled_path(t, layer), (shape[0],), "float32")
        per_shard(trajectory_path(t), plan.latent_shape, "float32")
    per_shard("latents", plan.latent_shape, "float32")
    per_shard("labels", plan.label_shape, plan.label_dtype)
    root.create_array("sample_names", shape=(n,), chunks=(s,), dtype=str, compressors=codecs)
    root.create_array("done", shape=(n,), chunks=(s,), dtype=bool, fill_value=False, compressors=codecs)
