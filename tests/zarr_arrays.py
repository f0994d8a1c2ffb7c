"""Every array of a Zarr store, for comparing two caches array by array."""

import zarr


def all_arrays(path: str) -> dict:
    out = {}
    group = zarr.open_group(path, mode="r")
    for name, array in group.arrays():
        out[name] = array[:]
    for name, _ in group.groups():
        out.update({f"{name}/{k}": v for k, v in all_arrays(f"{path}/{name}").items()})
    return out
