"""A cache as dask arrays and as an xarray DataTree, for analysis outside this code.

Both are lazy: nothing is read until computed. Dask's chunk is a shard along the sample axis (and
whole along the others), not zarr's inner chunk of one image: one task per image costs more in
scheduling than in reading (docs/performance.md). Dimension names and attributes come from the
layout, so a cache written before the store carried them opens the same way.
"""

from __future__ import annotations

import numpy as np

from .encoding import uint8_decode
from .layout import ATTRS_KEY, feature_path, feature_scale_path
from .store import CacheError
from .writer import array_attributes, lacking_objects

# The attributes of stored uint8 maps that say how to decode them: not those of decoded maps.
UINT8_KEYS = ("encoding", "decode", "scales", "scales_layout")


def _check_whole(cache) -> None:
    """Refuse a cache with rows not done or done shards lacking objects: both would read as fill values."""
    if not cache.complete:
        raise CacheError(f"cache {cache.path} is incomplete ({int(cache.done.sum())} of {len(cache)} samples "
                         "extracted), and its other rows would read as zeros; run `satdifuser extract` to finish it")
    shards = list(range(cache.plan.num_shards))
    lacking = lacking_objects(cache.root, cache.plan, shards)
    if lacking:
        shard, keys = next(iter(lacking.items()))
        raise CacheError(f"cache {cache.path}: shard {shard} is marked done but lacks {keys[0]}; run `satdifuser "
                         f"cache verify {cache.path}` and re-extract what it names")


def dask_arrays(cache, decode: bool = True) -> dict:
    """``{array path: dask array}`` for every array of the cache, in chunks of one shard; with
    ``decode``, uint8 maps come as the float16 values they encode (x = offset + scale * q)."""
    import dask.array as da

    _check_whole(cache)
    arrays = {}
    for name, spec in cache.specs.items():
        array = cache.array(name)
        arrays[name] = da.from_zarr(array, chunks=(spec.rows_per_file, *spec.shape[1:]), name=f"{cache.path}/{name}")
    if decode and cache.map_encoding == "uint8" and cache.plan.holds("maps"):
        for t in cache.timesteps:
            for layer in cache.layers:
                name = feature_path(t, layer)
                arrays[name] = da.blockwise(uint8_decode, "nchw", arrays[name], "nchw",
                                            arrays[feature_scale_path(t, layer)], "nck", dtype=np.float16,
                                            concatenate=True)
    return arrays


def datatree(cache, decode: bool = True):
    """An ``xarray.DataTree`` mirroring the store's groups (``features/t47`` holds a variable per
    layer), with the sample names as the ``sample`` coordinate of every node."""
    import xarray as xr

    arrays = dask_arrays(cache, decode)
    groups: dict[str, dict] = {}
    for name, spec in cache.specs.items():
        if name == "sample_names":
            continue
        group, _, var = name.rpartition("/")
        attributes = array_attributes(spec, cache.plan, cache.request)
        if decode and name.startswith("features/") and cache.map_encoding == "uint8":
            attributes = {k: v for k, v in attributes.items() if k not in UINT8_KEYS} | {"decoded_from": "uint8"}
        groups.setdefault(group, {})[var] = xr.Variable(spec.dims, arrays[name], attributes)
    root = xr.Dataset(groups.pop(""), coords={"sample": np.asarray(cache.sample_names, dtype=object)},
                      attrs={ATTRS_KEY: cache.attrs})
    return xr.DataTree.from_dict({"/": root, **{f"/{g}": xr.Dataset(v) for g, v in groups.items()}})
