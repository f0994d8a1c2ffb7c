"""Writing a cache one shard at a time, so a killed run resumes where it stopped.

What a store claims is always true: its provenance is written only after all its arrays exist, a
shard is marked done only after all its arrays are written (and its work added to the ledger), and a
store being replaced first stops claiming anything (its provenance gives way to a "being created"
mark) before any of its data is deleted. A kill at any moment leaves the old complete store, or a
store that resumes (or starts afresh), never one that claims data it does not hold.

A finished store carries consolidated metadata for other tools (``consolidate``); a writer drops it
before it creates or deletes arrays, so that what it lists is never stale.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
from zarr.dtype import VariableLengthUTF8

from . import encoding
from .layout import (
    ATTRS_KEY,
    CREATING_KEY,
    FORMAT_VERSION,
    ArraySpec,
    CachePlan,
    array_specs,
    compressors,
    done_spec,
    feature_path,
    feature_scale_path,
    object_key,
    ordered_tiers,
)
from .store import (
    CacheError,
    CacheMismatch,
    ChunkPresence,
    consolidate,
    differences,
    normalise,
    open_root,
    path_exists,
    remove,
    unconsolidate,
)

# While tiers are added to a complete cache (from its trajectory), the provenance names them under
# FILL_KEY and FILL_DONE marks the shards filled; the plan names them only once every shard is.
FILL_KEY = "filling"
FILL_DONE = "filling_done"
FILL_ENCODING = "filling_map_encoding"  # the encoding of the maps a fill adds


def _not_a_cache(path: str) -> CacheError:
    return CacheError(f"{path} exists but is not a feature cache; move it away or pass --overwrite")


def _open_existing(path: str, mode: str, storage_options: dict | None):
    """The root group at ``path`` and its provenance (None while being created); refuses what is not a cache."""
    try:
        root = open_root(path, mode, storage_options)
    except CacheError:
        raise
    except Exception:  # zarr raises several kinds for "no group here"
        raise _not_a_cache(path) from None
    stored = root.attrs.get(ATTRS_KEY)
    if stored is None and not root.attrs.get(CREATING_KEY):
        raise _not_a_cache(path)
    return root, stored


class CacheWriter:
    """Creates or reopens a store for a request, and writes whole shards into it."""

    def __init__(self, root, path: str, plan: CachePlan, done: str = "done", writes: list[str] | None = None):
        self.root = root
        self.path = path
        self.plan = plan
        # The array of done marks, and the arrays a shard writes (default: every array of the plan).
        self.done_array = done
        self._writes = writes

    @classmethod
    def reopen(cls, path: str, request: dict, storage_options: dict | None = None,
               mode: str = "r+") -> CacheWriter | None:
        """The store at ``path`` if it was built for ``request``; None if there is none.

        A cache built for another request is refused with the keys that differ (CacheMismatch);
        anything else at ``path`` is refused too, never deleted. A cache whose creation never
        finished counts as none. ``mode="r"`` opens it without writing anything.
        """
        if not path_exists(path, storage_options):
            return None
        root, stored = _open_existing(path, mode, storage_options)
        if stored is None:
            return None
        version = stored.get("format_version") if isinstance(stored, dict) else None
        if version != FORMAT_VERSION:
            raise CacheError(f"cache {path} has format version {version}, this version writes {FORMAT_VERSION}; "
                             "pass --overwrite to rebuild it")
        try:
            if not isinstance(stored.get("request"), dict):
                raise ValueError("its request is missing")
            plan = CachePlan.from_attrs(stored.get("plan"))
        except ValueError as err:
            raise CacheError(f"cache {path} has damaged attributes: {err}; pass --overwrite to rebuild it") from None
        diffs = differences(_encoding_named(stored["request"]), _encoding_named(request))
        if diffs:
            raise CacheMismatch(path, diffs, "pass --overwrite to rebuild it")
        return cls(root, path, plan)

    @classmethod
    def create(cls, path: str, request: dict, plan: CachePlan, info: dict | None = None,
               storage_options: dict | None = None) -> CacheWriter:
        """A new, empty store for ``request``, replacing whatever was at ``path``."""
        root = _emptied(path, storage_options)
        _create_arrays(root, plan, request)
        # Provenance last: until then the store is known to be half-created.
        root.attrs.put({ATTRS_KEY: {
            "format_version": FORMAT_VERSION,
            "request": normalise(request),
            "plan": plan.to_attrs(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **normalise(info or {}),
        }})
        return cls(root, path, plan)

    # --- what is done ----------------------------------------------------------------------
    def pending_shards(self) -> list[int]:
        return [s for s in range(self.plan.num_shards) if not self._shard_done(s)]

    def _shard_done(self, shard: int) -> bool:
        try:
            return bool(self.root[self.done_array][slice(*self.plan.shard_range(shard))].all())
        except Exception:  # an unreadable done chunk means the shard must be redone
            return False

    def done_shards(self) -> list[int]:
        return [s for s in range(self.plan.num_shards) if self._shard_done(s)]

    def restore_arrays(self) -> list[str]:
        """Create, empty, the arrays of the layout the store lacks (deleted by hand, say), so that the
        shards they were part of count as lacking objects and are extracted again; refuse an array
        whose shape or type differs from the plan's. Returns the names created."""
        created = []
        for spec in array_specs(self.plan):
            try:
                array = self.root[spec.name]
            except KeyError:
                if not created:
                    unconsolidate(self.root)
                _create_array(self.root, spec, self.plan, self.request)
                created.append(spec.name)
                continue
            if tuple(array.shape) != spec.shape or (spec.dtype != "str" and str(array.dtype) != spec.dtype):
                raise CacheError(f"cache {self.path}: array {spec.name} is {array.dtype} {tuple(array.shape)}, its "
                                 f"attributes say {spec.dtype} {spec.shape}; rebuild it with --overwrite")
        return created

    def clear_done(self, shards) -> None:
        """Mark shards as not done, so the next extraction writes them again."""
        for shard in shards:
            self.root[self.done_array][slice(*self.plan.shard_range(shard))] = False

    # --- writing -----------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], work: dict | None = None,
                    before_done=None, record: bool = True) -> dict:
        """Write every array of one shard, add ``work`` to the ledger, then mark the shard done.

        ``arrays`` maps store paths (``features/t47/up_blocks_1_attn1_0``, ``latents``, ...) to the
        shard's rows, feature maps as exact float16: they are encoded here in the plan's
        ``map_encoding`` (with their ``feature_scales`` for uint8), and the error of a lossy one is
        added to the ``map_error`` sums in the same attribute write as the ledger. All arrays must
        be present so a shard is never marked done half-written. The ledger is updated before the
        mark, so a kill in between counts the work (and the error sums) twice (it is redone), never
        not at all. ``before_done`` is called just before the mark (the writer's claim check).
        Without ``record`` the attributes are left alone (another process records the work, see
        ``add_work``); returns the error sums of the shard's lossy maps by ``t/layer``.
        """
        start, stop = self.plan.shard_range(shard)
        for name, rows in arrays.items():
            if len(rows) != stop - start:
                raise ValueError(f"shard {shard} of {name} has {len(rows)} rows, expected {stop - start}")
        arrays, errors = self._encoded(arrays)
        missing = sorted(set(self.array_paths()) - set(arrays))
        if missing:
            raise ValueError(f"shard {shard} lacks arrays {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for name, rows in arrays.items():
            self.root[name][start:stop] = rows
        if record:
            self.add_work(work or {}, errors)
        if before_done is not None:
            before_done()
        self.root[self.done_array][start:stop] = True
        return errors

    def add_work(self, work: dict, errors: dict) -> None:
        """Add ``work`` to the ledger and ``errors`` to the map error sums, in one attribute write."""
        if not (work or errors):
            return
        attrs = self.root.attrs[ATTRS_KEY]
        ledger = dict(attrs.get("ledger", {}))
        for key, value in work.items():
            ledger[key] = round(ledger.get(key, 0) + value, 3)
        sums = dict(attrs.get("map_error", {}))
        for key, value in errors.items():
            sums[key] = encoding.add_errors(sums.get(key), value)
        self.update_info(ledger=ledger, **({"map_error": sums} if errors else {}))

    def _encoded(self, arrays: dict) -> tuple[dict, dict]:
        """``arrays`` with the exact maps in the plan's encoding, and the error sums by ``t/layer``."""
        if self.plan.map_encoding == encoding.EXACT_ENCODING or not self.plan.holds("maps"):
            return arrays, {}
        out, errors = dict(arrays), {}
        for t in self.plan.timesteps:
            for layer in self.plan.layer_shapes:
                path = feature_path(t, layer)
                if path not in arrays:
                    continue
                out[path], scales, errors[f"{t}/{layer}"] = encoding.encode(self.plan.map_encoding, arrays[path])
                if scales is not None:
                    out[feature_scale_path(t, layer)] = scales
        return out, errors

    def array_paths(self) -> list[str]:
        """Every array a shard writes (all but ``done``)."""
        if self._writes is not None:
            return list(self._writes)
        return [spec.name for spec in array_specs(self.plan)[:-1]]

    # --- adding tiers to a complete cache --------------------------------------------------------
    @property
    def filling(self) -> list[str] | None:
        """The tiers an unfinished fill is adding, or None."""
        return self.root.attrs[ATTRS_KEY].get(FILL_KEY)

    def begin_fill(self, tiers, map_encoding: str | None = None) -> CacheWriter:
        """The writer of the arrays ``tiers`` add, with done marks of its own (``FILL_DONE``): a fill of
        the same tiers (and map encoding) is resumed, anything else of a fill's left in the store is
        replaced. Maps added to a cache that holds none take ``map_encoding`` (default: the plan's).
        The cache goes on holding only its old tiers, in their encoding, until ``finish_fill``."""
        tiers = list(ordered_tiers(tiers))
        plan = dataclasses.replace(self.plan, tiers=ordered_tiers((*self.plan.tiers, *tiers)))
        if map_encoding is not None and "maps" in tiers and not self.plan.holds("maps"):
            plan = dataclasses.replace(plan, map_encoding=map_encoding)
        unconsolidate(self.root)
        attrs = self.root.attrs[ATTRS_KEY]
        fresh = self.filling != tiers or attrs.get(FILL_ENCODING, self.plan.map_encoding) != plan.map_encoding
        if fresh:  # named first, so that whatever a killed fill leaves is known to be the fill's
            self.update_info(**{FILL_KEY: tiers, FILL_ENCODING: plan.map_encoding},
                             **({"map_error": {}} if "maps" in tiers else {}))
        held = {spec.name for spec in array_specs(self.plan)}
        added = [spec for spec in array_specs(plan) if spec.name not in held]
        for spec in (*added, done_spec(FILL_DONE, plan, "shards filled")):
            present = spec.name in self.root
            if present and fresh:
                del self.root[spec.name]
            if fresh or not present:
                _create_array(self.root, spec, plan, self.request)
        return CacheWriter(self.root, self.path, plan, FILL_DONE, [spec.name for spec in added])

    def finish_fill(self, **info) -> None:
        """Make the filled tiers held, in one write of the provenance, then drop the fill's done marks.
        The request then names the maps' encoding as an extraction of them would."""
        attrs = dict(self.root.attrs[ATTRS_KEY])
        attrs.pop(FILL_KEY, None)
        attrs.pop(FILL_ENCODING, None)
        extraction = {k: v for k, v in attrs["request"]["extraction"].items() if k != "map_encoding"}
        if self.plan.map_encoding != encoding.EXACT_ENCODING:
            extraction["map_encoding"] = self.plan.map_encoding
        attrs["request"] = {**attrs["request"], "extraction": extraction}
        attrs.update(plan=self.plan.to_attrs(), **normalise(info))
        self.root.attrs[ATTRS_KEY] = attrs
        del self.root[FILL_DONE]
        self.consolidate()

    def consolidate(self) -> None:
        """Consolidate the metadata of a finished store (see the module's note)."""
        consolidate(self.root)

    @property
    def request(self) -> dict:
        return self.root.attrs[ATTRS_KEY]["request"]

    def update_info(self, **values) -> None:
        attrs = dict(self.root.attrs[ATTRS_KEY])
        attrs.update(normalise(values))
        self.root.attrs[ATTRS_KEY] = attrs


def _encoding_named(request: dict) -> dict:
    """``request`` with its map encoding named even when exact (a request leaves the exact one out),
    so a mismatch reads 'cache 'uint8', requested 'float16''."""
    extraction = request.get("extraction")
    if not isinstance(extraction, dict) or "map_encoding" in extraction:
        return request
    return {**request, "extraction": {**extraction, "map_encoding": encoding.EXACT_ENCODING}}


def lacking_objects(root, plan: CachePlan, shards: list[int], names: list[str] | None = None) -> dict[int, list[str]]:
    """The stored objects that ``shards`` need and the store does not hold, by shard.

    A cheap check (one listing or a stat per object, no reads) made before a done shard is trusted:
    a Zarr read of a missing object returns fill values. Checksums and contents are `cache verify`'s.
    ``names`` limits the check to those arrays.
    """
    presence, lacking = ChunkPresence(root.store), {}
    for spec in array_specs(plan)[:-1]:
        if names is not None and spec.name not in names:
            continue
        try:
            array = root[spec.name]
        except KeyError:
            for shard in shards:
                lacking.setdefault(shard, []).append(f"{spec.name} (the whole array)")
            continue
        for shard in shards:
            key = object_key(array, shard)
            if not presence.has(key):
                lacking.setdefault(shard, []).append(key)
    return lacking


def _emptied(path: str, storage_options: dict | None):
    """An empty root group at ``path`` that claims nothing, whatever was there.

    A cache (or a half-created one) first loses its provenance, in one write of its root metadata,
    and only then its arrays; anything else at ``path`` is removed whole (``--overwrite``).
    """
    if path_exists(path, storage_options):
        try:
            root, _ = _open_existing(path, "r+", storage_options)
        except CacheError:
            remove(path, storage_options)
        else:
            root.attrs.put({CREATING_KEY: True})  # the consolidated copy goes with the provenance
            for name in sorted(dict(root.members())):
                del root[name]
            return root
    root = open_root(path, "w", storage_options)
    root.attrs.put({CREATING_KEY: True})
    return root


def _create_arrays(root, plan: CachePlan, request: dict | None = None) -> None:
    for spec in array_specs(plan):
        _create_array(root, spec, plan, request)


def array_attributes(spec: ArraySpec, plan: CachePlan, request: dict | None) -> dict:
    """What ``spec``'s array holds, for a reader without this code: its description and the spec's
    attributes, the UNet timestep of its label, the classes of the labels, the decoding of maps."""
    attributes = {"description": spec.description, **spec.attrs}
    unet = ((request or {}).get("extraction") or {}).get("unet_timesteps") or {}
    if spec.attrs.get("label") in unet:
        attributes["unet_timestep"] = unet[spec.attrs["label"]]
    if spec.name == "labels":
        attributes.update(class_attributes(plan, ((request or {}).get("dataset") or {}).get("class_names")))
    if spec.name.startswith("features/"):
        attributes.update(encoding.array_attributes(plan.map_encoding, *spec.name.split("/")[1:]))
    return attributes


def class_attributes(plan: CachePlan, names) -> dict:
    """The class names, and for class indices (labels and label maps) the CF ``flag_values`` and
    ``flag_meanings`` (blank-separated, so blanks in a name become underscores) that cf-xarray reads."""
    if not names:
        return {}
    attributes = {"class_names": list(names)}
    if len(plan.label_shape) != 1:  # a multi-label vector's axis is the class, its values 0/1
        attributes.update(flag_values=list(range(len(names))),
                          flag_meanings=" ".join("_".join(str(n).split()) for n in names))
    return attributes


def _create_array(root, spec: ArraySpec, plan: CachePlan, request: dict | None = None) -> None:
    extra = {"fill_value": False} if spec.dtype == "bool" else {}
    # Zarr v3's registered `string` type (vlen-utf8), named rather than left to what zarr makes of "str".
    dtype = VariableLengthUTF8() if spec.dtype == "str" else spec.dtype
    root.create_array(spec.name, shape=spec.shape, chunks=spec.chunks, shards=spec.shards, dtype=dtype,
                      compressors=compressors(plan.codec), attributes=array_attributes(spec, plan, request),
                      dimension_names=spec.dims or None, **extra)
