import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.layout import pooled_path
from pipeline.cache.store import CacheError
from pipeline.probe.map import Probe, ProbeSettings
from pipeline.probe.run import TaskInfo, open_task_caches, run_probe

FAST = ProbeSettings(c_grid=(0.1, 1.0), n_jobs=2, max_iter=100, seg_pixels=8)


@pytest.fixture(scope="module")
def client():
    """Two worker processes, started as ``--scheduler processes`` starts them."""
    from pipeline.cluster import connect

    with connect("processes", workers=2) as c:
        yield c


def task_caches(cached_demo, exp: str) -> tuple[str, dict, TaskInfo]:
    folder = str(Path(cached_demo(exp).cache_path("train")).parent)
    caches = open_task_caches(folder)
    return folder, caches, TaskInfo.of(caches)


@pytest.mark.parametrize("exp", ["demo_cls", "demo_seg"])
def test_the_probe_map_on_two_worker_processes_equals_the_local_one(cached_demo, client, exp):
    _, caches, info = task_caches(cached_demo, exp)
    local = Probe(caches, info.kind, info.num_classes, FAST)
    remote = Probe(caches, info.kind, info.num_classes, FAST, client)
    rows = remote.run()
    assert rows == local.run()  # every row: C, val, metrics, bit for bit
    assert len(rows) == len(local.cells()) and len({r["C"] for r in rows}) >= 1
    # the inputs were read on the workers, not here
    assert not any(split._parts for split in remote.splits.values())
    # label efficiency: a subset of train, from the inputs already on the cluster
    idx = np.array([7, 0, 3, 12, 15, 18])
    cells = local.cells()[:2]
    assert remote.run(cells, train_indices=idx) == local.run(cells, train_indices=idx)
    np.testing.assert_array_equal(remote.train_labels(idx), local.train_labels(idx))


def test_segmentation_samples_pixels_shard_by_shard_on_the_workers(cached_demo, client):
    _, caches, info = task_caches(cached_demo, "demo_seg")
    remote = Probe(caches, info.kind, info.num_classes, FAST, client)
    t, layer = remote.timesteps[0], remote.layers[0]
    part = remote.cluster._part("train", t, layer)
    # one task per shard of maps, each a shard's sample, never the split's maps
    assert part.numblocks[0] == caches["train"].plan.num_shards
    assert part.chunks[0][0] == caches["train"].plan.shard_size * FAST.seg_pixels
    np.testing.assert_array_equal(part.compute(), Probe(caches, info.kind, info.num_classes, FAST).splits["train"]
                                  .part(t, layer))


def test_run_probe_on_a_local_scheduler_writes_the_local_map(cached_demo, tmp_path):
    folder, _, _ = task_caches(cached_demo, "demo_cls")
    run_probe(folder, tmp_path / "here", FAST)
    run_probe(folder, tmp_path / "dask", FAST, scheduler="local")
    here, dask = (json.loads((tmp_path / d / "probe_map.json").read_text()) for d in ("here", "dask"))
    assert dask["rows"] == here["rows"] and dask["best"] == here["best"]


def test_a_missing_shard_is_one_line_naming_it_not_fill_values(cached_demo, client, tmp_path):
    import shutil

    folder, caches, info = task_caches(cached_demo, "demo_cls")
    copy = tmp_path / "task"
    shutil.copytree(folder, copy)
    caches = open_task_caches(str(copy))
    name = pooled_path(caches["val"].timesteps[0], caches["val"].layers[0])
    (copy / "val.zarr" / name / "c" / "0" / "0").unlink()
    last = caches["val"].plan.shard_range(0)[1] - 1
    with pytest.raises(CacheError, match=rf"array {name}, rows 0-{last}: its stored object {name}/c/0/0 is missing"):
        Probe(caches, info.kind, info.num_classes, FAST, client).run()
