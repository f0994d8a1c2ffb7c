"""GEO-Bench partitions of the demo task, found in a train split by sample name."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.partitions import PartitionError, fraction, list_partitions, partition_indices

TASK = "classification_v1.0/demo-landcover"


def train_names(task_dir, partition: str) -> list[str]:
    return json.loads((task_dir / f"{partition}_partition.json").read_text())["train"]


def test_a_fraction_is_read_from_the_partition_name():
    assert fraction("0.10x_train") == pytest.approx(0.1) and fraction("1.00x_train") == 1.0 and fraction("2x_train") == 2
    with pytest.raises(PartitionError, match=r"--partition 'default' is not a training-fraction partition like "):
        fraction("default")


def test_the_fraction_partitions_are_listed_smallest_first_without_default(demo_root):
    names = list_partitions(demo_root / TASK)
    assert names and "default" not in names
    assert [fraction(n) for n in names] == sorted(fraction(n) for n in names)
    assert names[0] == "0.01x_train" and names[-1] == "1.00x_train"


def test_indices_follow_the_partitions_order_in_a_split_of_any_order(demo_root):
    task = demo_root / TASK
    names = train_names(task, "default")
    shuffled = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    train = SimpleNamespace(sample_names=shuffled, path="train.zarr")
    for partition in ("0.20x_train", "default"):
        idx = partition_indices(task, partition, train)
        assert idx.dtype == np.int64 and [shuffled[i] for i in idx] == train_names(task, partition)


def test_what_cannot_be_found_is_one_line_naming_the_input_and_the_fix(demo_root, tmp_path):
    task = demo_root / TASK
    names = train_names(task, "0.50x_train")
    lacking = SimpleNamespace(sample_names=[n for n in names if n != names[1]], path="small.zarr")
    with pytest.raises(PartitionError, match=rf"^train_partition 0.50x_train: 1 of its training samples \(e.g. "
                                             rf"'{names[1]}'\) are not in the train cache small.zarr; extract train "):
        partition_indices(task, "0.50x_train", lacking, flag="train_partition")
    with pytest.raises(PartitionError, match=r"^--partition '0.3x_train': .* has partitions \['0.01x_train', "):
        partition_indices(task, "0.3x_train", lacking)
    with pytest.raises(PartitionError, match=r"is not a GEO-Bench task folder .*; check the config"):
        partition_indices(tmp_path, "default", lacking, hint="check the config")
