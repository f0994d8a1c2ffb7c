import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, jaccard_score

from pipeline.cache.reader import open_cache
from pipeline.probe.map import (
    ALL,
    Cell,
    Probe,
    ProbeError,
    ProbeSettings,
    _accuracy,
    _logistic,
    _micro_f1,
    _miou,
    best_cells,
    map_cells,
)
from pipeline.synthetic import write_synthetic_cache

TIMESTEPS = ("t47", "t45", "t40")
SHAPES = {"up_blocks_1_attn1_0": (8, 2, 2), "up_blocks_1_conv2_0": (8, 2, 2), "up_blocks_2_attn1_0": (6, 4, 4),
          "up_blocks_3_conv2_0": (4, 8, 8)}
SIGNAL = ("t45", "up_blocks_2_attn1_0")
FAST = ProbeSettings(c_grid=(0.01, 1.0), n_jobs=1, max_iter=200)


def make_caches(root, labels: dict, signal=None, shapes=SHAPES, strength=2.0) -> dict:
    caches = {}
    for split, y in labels.items():  # one seed: the same class means, other noise per split
        path = str(root / f"{split}.zarr")
        write_synthetic_cache(path, y, TIMESTEPS, shapes, {signal or SIGNAL: strength}, shard_size=16, seed=0,
                              split=split, num_classes=4 if np.asarray(y).ndim != 2 else None)
        caches[split] = open_cache(path)
    return caches


@pytest.fixture(scope="module")
def cls_caches(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("probe-cls")
    return make_caches(root, {s: rng.integers(0, 4, n) for s, n in (("train", 64), ("val", 32), ("test", 32))})


def test_map_has_every_cell_then_timestep_then_all():
    cells = map_cells(["t47", "t40"], ["a", "b", "c"])
    assert len(cells) == 2 * 3 + 2 + 1
    assert cells[0] == Cell("t47", "a") and cells[6:] == [Cell("t47", ALL), Cell("t40", ALL), Cell(ALL, ALL)]
    assert Cell("t40", ALL).parts(["t47", "t40"], ["a", "b"]) == [("t40", "a"), ("t40", "b")]


def test_layer_carrying_the_label_ranks_first(cls_caches):
    rows = Probe(cls_caches, "classification", 4, FAST).run()
    assert len(rows) == len(TIMESTEPS) * len(SHAPES) + len(TIMESTEPS) + 1
    single = sorted((r for r in rows if ALL not in (r["timestep"], r["layer"])), key=lambda r: -r["val"])
    assert (single[0]["timestep"], single[0]["layer"]) == SIGNAL
    assert single[0]["value"] > 0.9 and single[0]["knn_accuracy"] > 0.9
    assert max(r["value"] for r in single[1:]) < 0.6  # noise: near chance (0.25)
    best = best_cells(rows)
    assert best["best layer"] == Cell(*SIGNAL) and best["best timestep"] == Cell("t45", ALL)
    assert best["all"] == Cell(ALL, ALL)
    by_cell = {(r["timestep"], r["layer"]): r for r in rows}
    assert by_cell[("t45", ALL)]["dims"] == sum(s[0] for s in SHAPES.values())
    assert by_cell[(ALL, ALL)]["dims"] == 3 * sum(s[0] for s in SHAPES.values())


def test_classification_metrics_equal_sklearn_on_the_same_predictions(cls_caches):
    probe = Probe(cls_caches, "classification", 4, FAST)
    cell = Cell("t47", "up_blocks_1_attn1_0")  # a noise cell, so the metrics are not trivially 1
    row = probe.run([cell])[0]
    X = {s: probe.splits[s].matrix(cell, probe.timesteps, probe.layers) for s in ("train", "val", "test")}
    y = {s: probe.splits[s].labels(4) for s in ("train", "val", "test")}
    scaler, (c, val, model) = _logistic(X["train"], y["train"], X["val"], y["val"], FAST, _accuracy)
    pred = model.predict(scaler.transform(X["test"]))
    assert row["C"] == c and c in FAST.c_grid
    assert row["val"] == pytest.approx(accuracy_score(y["val"], model.predict(scaler.transform(X["val"]))))
    assert row["value"] == pytest.approx(accuracy_score(y["test"], pred))
    assert row["macro_f1"] == pytest.approx(f1_score(y["test"], pred, average="macro", labels=range(4), zero_division=0))
    np.testing.assert_array_equal(y["test"], cls_caches["test"].labels(range(32)).numpy())
    np.testing.assert_allclose(X["train"], cls_caches["train"].pooled(range(64), ["t47"], [cell.layer])["t47"][cell.layer])


def test_chosen_c_is_the_best_on_validation(cls_caches):
    probe = Probe(cls_caches, "classification", 4, ProbeSettings(c_grid=(1e-4, 10.0), n_jobs=1))
    row = probe.run([Cell(*SIGNAL)])[0]
    # C = 1e-4 shrinks the weights to almost nothing; the strong signal wants the weak penalty.
    assert row["C"] == 10.0 and row["val"] == 1.0


def test_multilabel_metrics_equal_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    caches = make_caches(tmp_path, {s: rng.integers(0, 2, (n, 5)).astype(np.uint8)
                                    for s, n in (("train", 64), ("val", 32), ("test", 32))})
    probe = Probe(caches, "multi_label_classification", 5, FAST)
    row = probe.run([Cell(*SIGNAL)])[0]
    X = {s: probe.splits[s].matrix(Cell(*SIGNAL), probe.timesteps, probe.layers) for s in ("train", "val", "test")}
    y = {s: probe.splits[s].labels(5) for s in ("train", "val", "test")}
    scaler, (c, _, model) = _logistic(X["train"], y["train"], X["val"], y["val"], FAST, _micro_f1, True)
    scores = model.predict_proba(scaler.transform(X["test"]))
    assert row["metric"] == "micro_f1" and row["C"] == c
    assert row["value"] == pytest.approx(f1_score(y["test"], (scores > 0.5).astype(int), average="micro"))
    present = y["test"].sum(axis=0) > 0
    assert row["mean_average_precision"] == pytest.approx(
        average_precision_score(y["test"][:, present], scores[:, present], average="macro"))
    assert row["value"] > 0.8


@pytest.fixture(scope="module")
def seg_caches(tmp_path_factory):
    rng = np.random.default_rng(2)

    def masks(n):  # blocky 16 x 16 masks: 4 x 4 cells of one class each
        return np.kron(rng.integers(0, 4, (n, 4, 4)), np.ones((4, 4), dtype=np.int64)).astype(np.uint8)

    root = tmp_path_factory.mktemp("probe-seg")
    return make_caches(root, {s: masks(n) for s, n in (("train", 32), ("val", 16), ("test", 16))})


def test_segmentation_finds_the_signal_layer_and_reports_sklearn_miou(seg_caches):
    settings = ProbeSettings(c_grid=(0.1, 10.0), n_jobs=2, seg_pixels=16)
    probe = Probe(seg_caches, "segmentation", 4, settings)
    assert probe.grid == 8  # the widest map
    rows = probe.run()
    assert best_cells(rows)["best layer"] == Cell(*SIGNAL)
    by_cell = {(r["timestep"], r["layer"]): r for r in rows}
    row = by_cell[SIGNAL]
    assert row["n_train_pixels"] == 32 * 16 and row["value"] > 0.8  # bilinear upsampling blurs block edges
    assert max(r["value"] for k, r in by_cell.items() if ALL not in k and k != SIGNAL) < 0.4
    X = {s: probe.splits[s].matrix(Cell(*SIGNAL), probe.timesteps, probe.layers) for s in ("train", "val", "test")}
    y = {s: probe.splits[s].labels(4) for s in ("train", "val", "test")}
    assert len(y["test"]) == 16 * 64  # every pixel of the grid in test
    scaler, (c, _, model) = _logistic(X["train"], y["train"], X["val"], y["val"], settings, _miou(4))
    pred = model.predict(scaler.transform(X["test"]))
    assert row["value"] == pytest.approx(jaccard_score(y["test"], pred, average="macro", labels=range(4), zero_division=0),
                                         abs=1e-5)


def test_segmentation_labels_on_the_grid_are_the_majority(seg_caches):
    probe = Probe(seg_caches, "segmentation", 4, ProbeSettings(seg_grid=4, n_jobs=1))
    masks = seg_caches["test"].labels(range(16)).numpy()
    # each 4 x 4 block of the masks is one class, so the 4 x 4 grid is the block's class
    np.testing.assert_array_equal(probe.splits["test"].labels(4), masks[:, ::4, ::4].reshape(-1))


def test_training_pixels_are_a_fixed_seeded_sample(seg_caches):
    a = Probe(seg_caches, "segmentation", 4, ProbeSettings(seg_pixels=8)).splits["train"]
    b = Probe(seg_caches, "segmentation", 4, ProbeSettings(seg_pixels=8)).splits["train"]
    np.testing.assert_array_equal(a._pixels, b._pixels)
    assert a._pixels.shape == (32, 8) and len(a.labels(4)) == 32 * 8
    assert all(len(set(row)) == 8 for row in a._pixels)


def test_subset_reads_exactly_those_samples(cls_caches):
    probe = Probe(cls_caches, "classification", 4, FAST)
    idx = np.array([5, 2, 40, 63])
    view = probe.splits["train"].subset(idx)
    layer = "up_blocks_3_conv2_0"
    np.testing.assert_array_equal(view.part("t40", layer), cls_caches["train"].pooled(idx, ["t40"], [layer])["t40"][layer])
    np.testing.assert_array_equal(view.labels(4), cls_caches["train"].labels(idx).numpy())
    assert probe.run([Cell(*SIGNAL)], train_indices=idx)[0]["n_train"] == 4


def test_memory_guard_names_the_settings_to_lower(seg_caches):
    with pytest.raises(ProbeError, match=r"over max_gb=1e-05; lower seg_pixels, seg_eval_pixels or seg_grid"):
        Probe(seg_caches, "segmentation", 4, ProbeSettings(max_gb=1e-5))


def test_memory_guard_names_a_pixel_sample_that_fits(seg_caches):
    dims = sum(s[0] for s in seg_caches["train"].layer_shapes.values()) * len(seg_caches["train"].timesteps)
    max_gb = 64 * 5 * dims * 8 / 2**30  # 64 images: 5 pixels each fit, and not 6
    with pytest.raises(ProbeError, match=r"a sample of 5 pixels per image fits: --set seg_pixels=5 --set seg_eval_pixels=5"):
        Probe(seg_caches, "segmentation", 4, ProbeSettings(max_gb=max_gb * 1.01))
    Probe(seg_caches, "segmentation", 4, ProbeSettings(max_gb=max_gb * 1.01, seg_pixels=5, seg_eval_pixels=5))
    with pytest.raises(ProbeError, match=r"even one pixel per image needs"):
        Probe(seg_caches, "segmentation", 4, ProbeSettings(max_gb=1e-5))


@pytest.mark.parametrize("values, message", [
    ({"c_grid": []}, "c_grid .* must be a list of positive numbers"),
    ({"c_grid": [1, -1]}, "c_grid"),
    ({"seg_pixels": 0}, "seg_pixels 0 must be a positive integer"),
    ({"cgrid": [1]}, r"unknown keys \['cgrid'\]"),
    ({"max_gb": "abc"}, "max_gb 'abc' must be a positive number"),
    ({"seed": -1}, "seed -1 must be a non-negative integer"),
    ({"knn_k": True}, "knn_k True must be a positive integer"),
])
def test_settings_are_checked_up_front(values, message):
    with pytest.raises(ProbeError, match=message):
        ProbeSettings.from_dict(values)


def test_settings_from_dict():
    s = ProbeSettings.from_dict({"c_grid": [0.5, 2], "seg_eval_pixels": None, "seg_pixels": 16})
    assert s.c_grid == (0.5, 2.0) and s.seg_pixels == 16 and s.seg_eval_pixels is None


def test_the_first_c_is_kept_when_it_is_best_on_validation(tmp_path):
    # Labels 80 % one class, features pure noise: a strong penalty predicts the majority class
    # (val 0.8), a weak one fits the noise and does worse; the ascending grid must keep the first.
    rng = np.random.default_rng(3)
    labels = {s: np.where(rng.random(n) < 0.8, 0, rng.integers(1, 4, n)) for s, n in (("train", 64), ("val", 40), ("test", 40))}
    caches = make_caches(tmp_path, labels, strength=0.0)
    probe = Probe(caches, "classification", 4, ProbeSettings(c_grid=(1e-4, 100.0), n_jobs=1))
    row = probe.run([Cell("t47", "up_blocks_1_attn1_0")])[0]
    assert row["C"] == 1e-4 and row["val"] == pytest.approx(np.mean(labels["val"] == 0))


def test_grid_labels_are_the_majority_not_a_corner(tmp_path):
    # Each 4 x 4 block: 9 pixels of class 1, 7 (its top-left corner among them) of class 2.
    block = np.ones((4, 4), dtype=np.uint8)
    block[:2, :3] = 2
    block[2, 0] = 2
    masks = np.tile(block, (3, 2, 2))  # 3 images of 8 x 8, four blocks each
    caches = make_caches(tmp_path, {s: masks for s in ("train", "val", "test")}, shapes={"up_blocks_2_attn1_0": (4, 2, 2)},
                         signal=("t45", "up_blocks_2_attn1_0"))
    labels = Probe(caches, "segmentation", 4, ProbeSettings(n_jobs=1)).splits["test"].labels(4)
    assert block.sum() == 9 * 1 + 7 * 2 and labels.tolist() == [1] * 12


def test_segmentation_subset_takes_those_images_pixels(seg_caches):
    probe = Probe(seg_caches, "segmentation", 4, ProbeSettings(seg_pixels=8, n_jobs=1))
    full, idx = probe.splits["train"], np.array([3, 0, 17])
    view = full.subset(idx)
    layer = "up_blocks_3_conv2_0"
    np.testing.assert_array_equal(view.part("t47", layer), full.part("t47", layer).reshape(32, 8, -1)[idx].reshape(24, -1))
    np.testing.assert_array_equal(view.labels(4), full.labels(4).reshape(32, 8)[idx].reshape(-1))
    # and those rows are the maps of exactly those images, resized to the grid, at their sampled pixels
    maps = seg_caches["train"].features(idx, ["t47"], [layer])["t47"][layer].float()
    grid = torch.nn.functional.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False).flatten(2)
    expected = np.stack([grid[i][:, full._pixels[j]].T.numpy() for i, j in enumerate(idx)]).reshape(24, -1)
    np.testing.assert_allclose(view.part("t47", layer), expected, rtol=1e-6)
