"""Stage probe: the probe map of a task's caches and its label-efficiency curve."""

import argparse
import logging

from pipeline.cluster import CONNECT_TIMEOUT
from pipeline.probe import ProbeSettings
from pipeline.probing import TaskInfo, open_task_caches, run_probe
from stages import params, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--geobench-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = params("probe")
    settings = ProbeSettings.from_dict(p.get("settings") or {}, "params.yaml probe.settings")
    partitions = p.get("partitions") or None
    if isinstance(partitions, str):  # "all"
        partitions = [partitions]
    info = TaskInfo.of(open_task_caches(args.cache))
    task_dir = f"{args.geobench_dir}/{info.geobench_task}" if info.geobench_task else None
    metrics = run_probe(args.cache, args.out, settings, task_dir, partitions, int(p.get("seeds", 0)),
                        scheduler=p.get("scheduler"), scheduler_timeout=p.get("scheduler_timeout", CONNECT_TIMEOUT))
    best = metrics["best_layer"]
    print(f"{args.out}: best layer {best['timestep']} {best['layer']}, test {metrics['metric']} {best['test']:.4f}")


if __name__ == "__main__":
    run(main)
