import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.data.geobench_task import GeoBenchSplit, TaskSource, to_model_input


def source(demo_root, exp="demo_cls", **overrides) -> TaskSource:
    cfg = load_config(f"configs/{exp}_exp.yaml", {"geobench_dir": str(demo_root), **overrides})
    return TaskSource.from_config(cfg)


def test_demo_task_reads_back_through_geobench(demo_root):
    import geobench

    split = GeoBenchSplit(source(demo_root), "val")  # "val" is GEO-Bench's "valid"
    assert len(split) == 8
    item = split[2]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    task_dir = demo_root / "classification_v1.0" / "demo-landcover"
    assert geobench.load_task_specs(task_dir).dataset_name == "demo-landcover"
    raw = geobench.GeobenchDataset(task_dir, split="valid", band_names=("red", "green", "blue"))
    assert [raw[i].sample_name for i in range(len(raw))] == split.names
    sample = raw[2]
    assert int(item["label"]) == sample.label and item["name"] == sample.sample_name
    rgb, _ = sample.pack_to_3d(band_names=("04", "03", "02"))
    torch.testing.assert_close(item["image"], to_model_input(rgb, 4095.0, 128))


def test_model_input_matches_the_reference_transform():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 6000, size=(40, 60, 3)).astype(np.int16)
    out = to_model_input(rgb, 4095.0, 32)
    # Reference: x / 4095, clip to [0, 1], shorter side resized bilinear with antialias, (x - 0.5) / 0.5.
    x = torch.from_numpy(np.clip(rgb.transpose(2, 0, 1).astype(np.float32) / 4095, 0, 1))
    want = F.interpolate(x[None], size=(32, 48), mode="bilinear", antialias=True, align_corners=False)[0]
    assert out.shape == (3, 32, 48)
    torch.testing.assert_close(out, (want - 0.5) / 0.5)
    same = to_model_input(rgb[:32, :32], 4095.0, 32)
    torch.testing.assert_close(same, (x[:, :32, :32] - 0.5) / 0.5)  # no resize at the model size


def test_segmentation_labels_are_pixel_maps(demo_root):
    split = GeoBenchSplit(source(demo_root, "demo_seg"), "train")
    label = split[0]["label"]
    assert label.shape == (64, 64) and label.dtype == np.uint8 and label.max() < 4


def test_multi_label_task_written_by_geobench(multilabel_root):
    root, labels = multilabel_root
    src = TaskSource("toy", "multi_label_classification", root, "classification_v1.0/toy-multilabel",
                     ("04", "03", "02"), 4095.0, 32, 5)
    split = GeoBenchSplit(src, "train")
    for i in range(len(split)):
        np.testing.assert_array_equal(split[i]["label"], labels[split.names[i]])
    assert split[0]["image"].shape == (3, 32, 32)
    wrong = TaskSource("toy", "multi_label_classification", root, "classification_v1.0/toy-multilabel",
                       ("04", "03", "02"), 4095.0, 32, 43)
    with pytest.raises(ValueError, match="has 5 labels but num_classes is 43"):
        GeoBenchSplit(wrong, "train")[0]


def test_partitions_select_their_samples(demo_root):
    small = GeoBenchSplit(source(demo_root, partition="0.20x_train"), "train")
    full = GeoBenchSplit(source(demo_root), "train")
    assert len(small) == 4 and set(small.names) <= set(full.names)
    assert small.provenance()["partition"] == "0.20x_train"


def test_known_tasks_need_no_extra_keys_and_unknown_ones_say_what_to_set(tmp_path):
    cfg = load_config("configs/eurosat_exp.yaml", {"geobench_dir": str(tmp_path)})
    src = TaskSource.from_config(cfg)
    assert src.task_dir == tmp_path / "classification_v1.0" / "m-eurosat"
    assert src.bands == ("04", "03", "02") and src.band_scale == 4095.0
    with pytest.raises(FileNotFoundError, match="m-eurosat.*set geobench_dir or GEO_BENCH_DIR"):
        GeoBenchSplit(src, "train")
    odd = load_config("configs/eurosat_exp.yaml", {"dataset_name": "mystery", "geobench_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="set geobench_task, bands, band_scale in its task file"):
        TaskSource.from_config(odd)
