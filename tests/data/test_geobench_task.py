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


# ---- the twelve GEO-Bench v1 tasks ---------------------------------------------------------------

from pipeline.data.geobench_task import KNOWN_TASKS, class_names, load_task_specs, partition_file  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from tests.data.v1_fakes import FAKES, write_fake  # noqa: E402


@pytest.mark.parametrize("fake", FAKES, ids=[f.dataset for f in FAKES])
def test_v1_config_agrees_with_the_known_task_table(fake):
    cfg = load_config(f"configs/{fake.exp}_exp.yaml")
    known = KNOWN_TASKS[cfg.dataset_name]
    assert (cfg.task, cfg.num_classes, cfg.original_img_size, cfg.img_size, cfg.prompt) == (
        known.task, known.num_classes, known.original_img_size, known.img_size, known.prompt)
    assert cfg.img_size in (256, 512)  # the DiffusionSat checkpoints' resolutions
    assert class_names(cfg) == known.class_names
    assert known.folder.startswith("m-") and known.geobench_task.split("/")[0] in (
        "classification_v1.0", "segmentation_v1.0")


def test_the_table_holds_the_twelve_v1_tasks():
    folders = {k.folder for k in KNOWN_TASKS.values()}
    assert folders == {"m-bigearthnet", "m-brick-kiln", "m-eurosat", "m-forestnet", "m-pv4ger", "m-so2sat",
                       "m-cashew-plant", "m-chesapeake", "m-NeonTree", "m-nz-cattle", "m-pv4ger-seg",
                       "m-SA-crop-type"}
    assert {f.dataset for f in FAKES} == set(KNOWN_TASKS)


def _fast(root, tiny_backbone, tmp_path, **extra) -> dict:
    return {"geobench_dir": str(root), "pretrained_model_name_or_path": str(tiny_backbone.root), "img_size": 64,
            "cache_dir": str(tmp_path / "cache"), "shard_size": 4, "extract_batch_size": 4, "num_workers": 0,
            "device": "cpu", "projection_dim": 128, "channels": 32, "batch_size": 4, "val_batch_size": 4,
            "max_train_epochs": 1, "eval_every_n_steps": 1, "moe_warmup_steps": 2,
            # The nine attn1 layers keep every task's run (probes, fusers, UPerNet) to seconds.
            "layer_idxs": {"up_blocks": {"attn1": "all", "conv2": []}}, **extra}


@pytest.mark.parametrize("fake", FAKES, ids=[f.dataset for f in FAKES])
def test_v1_task_runs_extract_probe_fit(fake, tmp_path, tiny_backbone):
    """Each task's fake, of its real bands, dtype, label kind and patch size, through extraction
    (tiny backbone, 64 px), the probe map and a one-epoch fit."""
    import json

    from pipeline.cache.reader import open_cache
    from pipeline.extract.run import Extraction
    from pipeline.fit.run import fit
    from pipeline.probe.map import ProbeSettings
    from pipeline.probe.run import run_probe

    root = tmp_path / "geobench"
    write_fake(root, fake)
    cfg = load_config(f"configs/{fake.exp}_exp.yaml", _fast(root, tiny_backbone, tmp_path))
    extraction = Extraction(cfg)
    for split in ("train", "val", "test"):
        assert extraction.run(split, progress=False).num_samples == {"train": 4, "val": 2, "test": 2}[split]
    train = open_cache(cfg.cache_path("train"))
    known = KNOWN_TASKS[cfg.dataset_name]
    assert train.request["dataset"]["class_names"] == list(known.class_names)
    labels = train.labels(list(range(len(train))))
    size = known.original_img_size
    want = {"segmentation": (4, size, size), "multi_label_classification": (4, known.num_classes)}.get(cfg.task, (4,))
    assert tuple(np.asarray(labels).shape) == want
    settings = ProbeSettings.from_dict({"c_grid": [1.0], "seg_pixels": 8, "n_jobs": 1}, "test")
    probe = run_probe(tmp_path / "cache" / cfg.dataset_name, tmp_path / "probe", settings)
    assert 0.0 <= probe["all"]["test"] <= 1.0
    metrics = fit(cfg, tmp_path / "fit", progress=False)
    assert metrics["epochs_run"] == 1 and json.loads((tmp_path / "fit" / "metrics.json").read_text())
    plot = tmp_path / "fit" / "plots" / ("iou.csv" if cfg.task == "segmentation" else "confusion.csv")
    if cfg.task != "multi_label_classification":
        named = {row.split(",")[0] for row in plot.read_text().splitlines()[1:]}
        assert named and named <= set(known.class_names)  # classes by name, not index


# ---- real GEO-Bench files --------------------------------------------------------------------------

EUROSAT = next(f for f in FAKES if f.dataset == "meurosat")
CATTLE = next(f for f in FAKES if f.dataset == "mnz-cattle")


def test_label_outside_num_classes_stops_extraction_naming_sample_and_value(tmp_path, tiny_backbone):
    from pipeline.extract.run import Extraction

    root = tmp_path / "geobench"
    write_fake(root, EUROSAT, labels={2: 12})
    # A loader worker finds it: the message still arrives whole, in one line.
    cfg = load_config("configs/eurosat_exp.yaml", _fast(root, tiny_backbone, tmp_path, num_workers=1))
    with pytest.raises(UserError, match=r"sample s2 has label value 12 outside classes 0\.\.9 \(num_classes 10\)") as err:
        Extraction(cfg).run("train", progress=False)
    assert "\n" not in str(err.value)


def test_segmentation_label_value_is_checked_before_it_becomes_uint8(tmp_path, tiny_backbone):
    from pipeline.extract.run import Extraction

    root = tmp_path / "geobench"
    bad = np.zeros((500, 500), np.int16)
    bad[10, 10] = 258  # 2 once wrapped into uint8: a valid class by accident
    write_fake(root, CATTLE, labels={1: bad})
    cfg = load_config("configs/nzcattle_exp.yaml", _fast(root, tiny_backbone, tmp_path))
    with pytest.raises(UserError, match=r"sample s1 has label value 258 outside classes 0\.\.1"):
        Extraction(cfg).run("train", progress=False)


def test_dangling_default_partition_link_names_its_target(tmp_path, tiny_backbone):
    import shutil

    written = tmp_path / "converted"
    task_dir = write_fake(written, EUROSAT)
    old_target = str(task_dir / "original_partition.json")
    root = tmp_path / "geobench"
    shutil.move(str(written), str(root))  # geobench linked default_partition.json by the old path
    moved = root / "classification_v1.0" / "m-eurosat"
    cfg = load_config("configs/eurosat_exp.yaml", _fast(root, tiny_backbone, tmp_path))
    with pytest.raises(UserError) as err:
        GeoBenchSplit(TaskSource.from_config(cfg), "train")
    assert str(err.value) == (f"{moved / 'default_partition.json'} is a symlink to {old_target}, which does not "
                              f"exist; ln -sf original_partition.json {moved / 'default_partition.json'}")
    (moved / "default_partition.json").unlink()
    (moved / "default_partition.json").symlink_to("original_partition.json")
    assert partition_file(moved, "default").is_file()
    assert len(GeoBenchSplit(TaskSource.from_config(cfg), "train")) == 4


def _pickle_as_old_geobench(task_dir):
    """Rewrite task_specs.pkl as geobench's predecessor (``ccb.io.*`` modules) pickled it."""
    import pickle

    import geobench
    from geobench import dataset, label, task

    specs = geobench.load_task_specs(task_dir)
    classes = {cls: cls.__module__ for cls in (task.TaskSpecifications, label.Classification, dataset.Sentinel2)}
    renamed = {task.TaskSpecifications: "ccb.io.task", label.Classification: "ccb.io.label",
               dataset.Sentinel2: "ccb.io.dataset"}
    try:
        for cls, module in renamed.items():
            cls.__module__ = module
        (task_dir / "task_specs.pkl").write_bytes(pickle.dumps(specs, protocol=4))
    finally:
        for cls, module in classes.items():
            cls.__module__ = module


def test_task_specs_of_older_geobench_load_through_its_loader(tmp_path, tiny_backbone):
    import subprocess
    import sys

    root = tmp_path / "geobench"
    task_dir = write_fake(root, EUROSAT)
    _pickle_as_old_geobench(task_dir)
    assert b"ccb.io.task" in (task_dir / "task_specs.pkl").read_bytes()
    load = f"import pickle; pickle.load(open({str(task_dir / 'task_specs.pkl')!r}, 'rb'))"
    plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert "No module named 'ccb'" in plain.stderr  # unreadable without geobench's module aliases
    assert load_task_specs(task_dir).label_type.n_classes == 10
    cfg = load_config("configs/eurosat_exp.yaml", _fast(root, tiny_backbone, tmp_path))
    assert GeoBenchSplit(TaskSource.from_config(cfg), "test")[0]["label"].dtype == np.int64


def test_unreadable_task_specs_is_one_line(tmp_path):
    root = tmp_path / "geobench"
    task_dir = write_fake(root, EUROSAT)
    (task_dir / "task_specs.pkl").write_bytes((task_dir / "task_specs.pkl").read_bytes()[:40])
    with pytest.raises(UserError, match=r"task_specs.pkl cannot be read by geobench .*'s loader \(\w+Error") as err:
        load_task_specs(task_dir)
    assert "\n" not in str(err.value)
