"""Writing a cache one shard at a time, so a killed run resumes where it stopped."""

from __future__ import annotations

import datetime as dt

import numpy as np

from .layout import (
    ATTRS_KEY, FORMAT_VERSION, CachePlan, compressors, feature_path, pooled_path, trajectory_path,
)
from .store import CacheMismatch, differences, exists, normalise, open_root, remove


class CacheWriter:
    """Creates or reopens a store for a request, and writes whole shards into it."""

    def __init__(self, root, path: str, plan: CachePlan):
        self.root = root
        self.path = path
        self.plan = plan

    @classmethod
    def reopen(cls, path: str, request: dict, storage_options: dict | None = None) -> "CacheWriter | None":
        """The store at ``path`` if it was built for ``request``; None if there is none.

        A store built for another request is refused with the keys that differ; a store whose
        creation never finished (no attributes yet) counts as none.
        """
        if not exists(path, storage_options):
            return None
        root = open_root(path, "r+", storage_options)
        stored = root.attrs.get(ATTRS_KEY)
        if stored is None:
            return None
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
        _create_arrays(root, plan)
        # Attributes last: a store without them is known to be half-created.
        root.attrs[ATTRS_KEY] = {
            "format_version": FORMAT_VERSION,
            "request": request,
            "plan": plan.to_attrs(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **(info or {}),
        }
        return cls(root, path, plan)

    def pending_shards(self) -> list[int]:
        done = self.root["done"][:]
        return [s for s in range(self.plan.num_shards) if not done[slice(*self.plan.shard_range(s))].all()]

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
    root.create_array("sample_names", shape=(n,), chunks=(s,), dtype=str)
    root.create_array("done", shape=(n,), chunks=(s,), dtype=bool, fill_value=False)
