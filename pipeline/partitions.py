"""GEO-Bench partitions: the named subsets of a task's samples (``default`` and the training
fractions ``0.01x_train`` ... ``1.00x_train``), read with geobench's loader and found in a train
cache by sample name. Probes and fits both pick their training images through this module."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import UserError

PARTITION = re.compile(r"^(\d+(?:\.\d+)?)x_train$")  # GEO-Bench's training-fraction partitions


class PartitionError(UserError):
    """A partition that cannot be read or found in the cache."""


def fraction(partition: str) -> float:
    m = PARTITION.match(partition)
    if not m:
        raise PartitionError(f"--partition {partition!r} is not a training-fraction partition like '0.10x_train'")
    return float(m.group(1))


def task_dataset(task_dir: Path, hint: str = "check --geobench-dir"):
    from geobench.dataset import GeobenchDataset

    from .data.geobench_task import partition_file

    partition_file(task_dir, "default")
    try:
        return GeobenchDataset(task_dir)
    except (ValueError, FileNotFoundError) as err:  # no such folder, or no default_partition.json
        raise PartitionError(f"{task_dir} is not a GEO-Bench task folder ({err}); {hint}") from None


def list_partitions(task_dir: Path) -> list[str]:
    """The task's ``<f>x_train`` partitions, smallest fraction first (read with geobench's loader)."""
    names = [p for p in task_dataset(task_dir).list_partitions() if PARTITION.match(p)]
    return sorted(names, key=fraction)


def partition_indices(task_dir: Path, partition: str, train, flag: str = "--partition",
                      hint: str = "check --geobench-dir") -> np.ndarray:
    """Row indices into the train cache of a partition's training samples, in the partition's order.
    ``flag`` names where the partition was asked (an option or a config key) in the errors."""
    dataset = task_dataset(task_dir, hint)
    if partition not in dataset.list_partitions():
        raise PartitionError(f"{flag} {partition!r}: {task_dir} has partitions {sorted(dataset.list_partitions())}")
    from .data.geobench_task import partition_file

    partition_file(task_dir, partition)
    names = dataset.load_partition(partition).partition_dict["train"]
    row = {name: i for i, name in enumerate(train.sample_names)}
    missing = [n for n in names if n not in row]
    if missing:
        raise PartitionError(f"{flag} {partition}: {len(missing)} of its training samples (e.g. {missing[0]!r}) are not "
                             f"in the train cache {train.path}; extract train from a partition that contains them "
                             "(e.g. 'default')")
    return np.array([row[n] for n in names], dtype=np.int64)
