"""The probe map here and on a Dask cluster of 2 worker processes, side by side, on one set of caches.

    python bench/scale_out_probe.py --train 2000 --eval 500 --seg-train 256 --seg-eval 64

Writes synthetic caches (``pipeline.synthetic``) of a classification task (pooled vectors of
``--layers`` layers x 3 timesteps, 320 channels each) and of a segmentation task (16 x 16 maps),
then times each probe map run here (joblib threads, ``n_jobs`` 2) and with ``--scheduler
processes`` (a ``LocalCluster`` of 2 worker processes): the cluster's start, and the map on it
with the inputs read from the cache on the workers. Checks that both give the same rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from pipeline.cache.reader import open_cache
from pipeline.cluster import connect
from pipeline.probe.map import Probe, ProbeSettings
from pipeline.synthetic import write_synthetic_cache

TIMESTEPS = ("t47", "t45", "t40")


def _caches(root: str, labels: dict, shapes: dict, classes: int) -> dict:
    caches = {}
    signal = {("t45", next(iter(shapes))): 1.0}
    for split, y in labels.items():
        path = os.path.join(root, f"{split}.zarr")
        write_synthetic_cache(path, y, TIMESTEPS, shapes, signal, num_classes=classes, shard_size=64, split=split,
                              seed=0)
        caches[split] = open_cache(path)
    return caches


def _tasks(root: str, train: int, evals: int, seg_train: int, seg_eval: int, layers: int) -> dict:
    rng = np.random.default_rng(0)
    sizes = lambda tr, ev: (("train", tr), ("val", ev), ("test", ev))  # noqa: E731
    cls = _caches(os.path.join(root, "cls"), {s: rng.integers(0, 10, n) for s, n in sizes(train, evals)},
                  {f"up_blocks_1_attn1_{i}": (320, 1, 1) for i in range(layers)}, 10)

    def masks(n):
        return np.kron(rng.integers(0, 4, (n, 4, 4)), np.ones((4, 4), dtype=np.int64)).astype(np.uint8)

    seg = _caches(os.path.join(root, "seg"), {s: masks(n) for s, n in sizes(seg_train, seg_eval)},
                  {f"up_blocks_2_attn1_{i}": (32, 16, 16) for i in range(2)}, 4)
    return {"classification": cls, "segmentation": seg}


def probe_part(train: int = 2000, evals: int = 500, seg_train: int = 256, seg_eval: int = 64, layers: int = 4,
               settings: ProbeSettings = ProbeSettings(c_grid=(0.01, 0.1, 1.0), n_jobs=2, seg_pixels=32,
                                                       seg_eval_pixels=64)) -> list[dict]:
    """Seconds of each task's probe map here and on 2 worker processes; prints them as a table."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = _tasks(tmp, train, evals, seg_train, seg_eval, layers)
        here = {}
        for kind, caches in tasks.items():
            start = time.perf_counter()
            here[kind] = (Probe(caches, kind, 10 if kind == "classification" else 4, settings).run(),
                          time.perf_counter() - start)
        start = time.perf_counter()
        with connect("processes", workers=2) as client:
            started = time.perf_counter() - start
            for kind, caches in tasks.items():
                start = time.perf_counter()
                rows = Probe(caches, kind, 10 if kind == "classification" else 4, settings, client).run()
                seconds = time.perf_counter() - start
                out.append({"task": kind, "probes": len(rows), "here_s": here[kind][1], "cluster_s": seconds,
                            "cluster_start_s": started, "equal": rows == here[kind][0]})
    print(f"{'task':<16}{'probes':>7}{'here (s)':>10}{'2 workers (s)':>15}{'cluster start (s)':>19}  equal")
    for r in out:
        print(f"{r['task']:<16}{r['probes']:>7}{r['here_s']:>10.1f}{r['cluster_s']:>15.1f}"
              f"{r['cluster_start_s']:>19.1f}  {r['equal']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500, help="images in each of val and test (classification)")
    parser.add_argument("--seg-train", type=int, default=256)
    parser.add_argument("--seg-eval", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4, help="layers per timestep (classification)")
    args = parser.parse_args()
    probe_part(args.train, args.eval, args.seg_train, args.seg_eval, args.layers)


if __name__ == "__main__":
    main()
