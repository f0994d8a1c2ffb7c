"""The plots of a fit, a probe run and the report, from small inputs made here."""

import csv
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
from PIL import Image

from pipeline.plots import grid_label_efficiency_plot, label_efficiency_plot, probe_heatmap, write_plots

TIMESTEPS = ["t47", "t40"]
LAYERS = ["up_blocks_1_attn1_0", "up_blocks_2_conv2_1", "up_blocks_3_conv2_2"]
HISTORY = [{"step": 1, "train_loss": 1.3}, {"step": 2, "train_loss": 1.1, "val_accuracy": 0.4},
           {"step": 3, "train_loss": 0.8}, {"step": 4, "train_loss": 0.6, "val_accuracy": 0.7}]


def drawn(path) -> tuple[int, int]:
    """The size of a PNG that decodes whole and holds more than a blank canvas."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10, f"{path} is (nearly) blank"
        return image.size


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def fit_result(test: dict, names=None):
    return SimpleNamespace(history=HISTORY, metrics={"selection_metric": "accuracy", "test": test}, class_names=names)


def fused(kind: str, **fuser):
    return SimpleNamespace(config=SimpleNamespace(fuser=kind), fuser=SimpleNamespace(**fuser))


def test_a_classification_fit_writes_curves_its_fusion_weights_and_its_confusion_matrix(tmp_path):
    weights = np.array([[0.1, 0.2, 0.05], [0.3, 0.25, 0.1]])
    cm = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 4]])
    model = fused("gw", timesteps=TIMESTEPS, layers=LAYERS)
    write_plots(tmp_path, fit_result({"confusion_matrix": cm.tolist()}, ["water", "forest", "urban"]), model,
                {"weights": weights})
    folder = tmp_path / "plots"
    assert sorted(p.name for p in folder.iterdir()) == ["confusion.csv", "confusion.png", "curves.png", "fusion.csv",
                                                       "fusion.png"]
    for name in ("curves.png", "fusion.png", "confusion.png"):
        drawn(folder / name)
    fusion = read_csv(folder / "fusion.csv")
    assert fusion[0] == ["timestep", "layer", "weight"] and len(fusion) == 1 + len(TIMESTEPS) * len(LAYERS)
    assert {(t, l): float(w) for t, l, w in fusion[1:]} == {
        (t, l): weights[i, j] for i, t in enumerate(TIMESTEPS) for j, l in enumerate(LAYERS)}
    confusion = read_csv(folder / "confusion.csv")
    assert confusion[0] == ["actual", "predicted"] and len(confusion) == 1 + cm.sum()  # one row per test image
    names = ["water", "forest", "urban"]
    assert Counter(map(tuple, confusion[1:])) == {(names[a], names[p]): n for (a, p), n in np.ndenumerate(cm) if n}


def test_a_segmentation_fit_writes_expert_usage_and_iou_per_class_and_no_confusion_matrix(tmp_path):
    usage = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    iou = [0.9, 0.5, 0.125]
    model = fused("moe", scales=(32, 16))
    write_plots(tmp_path, fit_result({"iou": iou, "confusion_matrix": [[1]]}, ["sea", "land", "ice"]), model,
                {"expert_usage": usage})
    folder = tmp_path / "plots"
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png", "fusion.csv", "fusion.png", "iou.csv", "iou.png"]
    for name in ("curves.png", "fusion.png", "iou.png"):
        drawn(folder / name)
    fusion = read_csv(folder / "fusion.csv")
    assert fusion[0] == ["scale", "expert", "usage"]
    assert [(int(s), int(e), float(u)) for s, e, u in fusion[1:]] == [
        (s, e, usage[i, e]) for i, s in enumerate((32, 16)) for e in range(4)]
    assert read_csv(folder / "iou.csv") == [["class", "iou"], ["sea", "0.9"], ["land", "0.5"], ["ice", "0.125"]]


def test_class_names_of_another_length_give_way_to_class_numbers(tmp_path):
    write_plots(tmp_path, fit_result({"iou": [0.25, 0.75]}, ["only one name"]), fused("lw", timesteps=[], layers=[]),
                {})
    assert read_csv(tmp_path / "plots" / "iou.csv") == [["class", "iou"], ["0", "0.25"], ["1", "0.75"]]
    assert not (tmp_path / "plots" / "fusion.csv").exists()  # no weights, no expert usage: no fusion table


def test_the_probe_heatmap_and_label_efficiency_plots_are_drawn(tmp_path):
    rows = [{"timestep": t, "layer": l, "value": 0.1 * (i + j)} for i, t in enumerate(TIMESTEPS + ["all"])
            for j, l in enumerate(LAYERS + ["all"]) if (t == "all") <= (l == "all")]
    rows.append({"timestep": "t40", "layer": LAYERS[0], "value": None})  # a probe that could not run
    best = SimpleNamespace(timestep="t40", layer=LAYERS[2])
    probe_heatmap(tmp_path / "heatmap.png", rows, TIMESTEPS, LAYERS, "accuracy", best)
    drawn(tmp_path / "heatmap.png")
    curve = [{"probe": "best_layer", "timestep": "t47", "layer": LAYERS[1], "fraction": f, "draw": d, "value": v}
             for f, d, v in ((0.1, "partition", 0.5), (0.1, 1, 0.45), (0.1, 2, 0.55), (1.0, "partition", 0.8))]
    label_efficiency_plot(tmp_path / "curve.png", curve, "accuracy")
    drawn(tmp_path / "curve.png")
    label_efficiency_plot(tmp_path / "empty.png", [], "accuracy", note="no fraction partitions in this task")
    drawn(tmp_path / "empty.png")


def test_the_reports_label_efficiency_panels_one_per_task_and_the_aggregate(tmp_path):
    def row(task, kind, method, fraction, value, low=math.nan, high=math.nan):
        return {"task": task, "kind": kind, "method": method, "fraction": fraction, "value": value, "low": low,
                "high": high}

    curve = [row("toy", "fit", "gw", 0.1, 0.6, 0.55, 0.65), row("toy", "fit", "gw", 1.0, 0.8, 0.7, 0.85),
             row("toy", "probe", "best_layer", 0.1, 0.5, 0.45, 0.55), row("toy2", "fit", "gw", 1.0, 0.7),
             row("aggregated", "fit", "gw", 1.0, 0.75, 0.7, 0.8)]
    grid_label_efficiency_plot(tmp_path / "grid.png", curve, {"toy": "accuracy", "toy2": "miou"})
    width, height = drawn(tmp_path / "grid.png")
    one_task = tmp_path / "one.png"
    grid_label_efficiency_plot(one_task, curve[:3], {"toy": "accuracy"})
    assert width > 2.5 * drawn(one_task)[0] and height == drawn(one_task)[1]  # three panels side by side
