import csv
import json

import numpy as np

from pipeline.report import write_report
from pipeline.synthetic import write_synthetic_cache


def test_report_gathers_results_and_totals_the_ledger(tmp_path):
    for split, n in (("train", 12), ("test", 4)):
        writer = write_synthetic_cache(str(tmp_path / "cache" / "toy" / f"{split}.zarr"), np.arange(n) % 2, ("t47",),
                                       {"a": (4, 2, 2)}, shard_size=4, split=split)
        writer.update_info(ledger={"unet_passes": 10 * n, "vae_passes": n, "bytes_stored": 1000 * n})
    fit_dir = tmp_path / "experiments" / "toy" / "gw" / "default" / "seed42"
    fit_dir.mkdir(parents=True)
    (fit_dir / "metrics.json").write_text(json.dumps({
        "test": {"accuracy": 0.75}, "test_score": 0.75, "epochs_run": 3, "train_seconds": 1.5}))
    (fit_dir / "run.json").write_text(json.dumps({
        "dataset": "toy", "fuser": "gw", "partition": "default", "seed": 42, "selection_metric": "accuracy",
        "ledger": {"unet_passes": 0, "reference_unet_passes": 800}}))
    stopped = tmp_path / "experiments" / "toy" / "lw" / "default" / ".seed42.partial"  # a fit that did not finish
    stopped.mkdir(parents=True)
    for name in ("metrics.json", "run.json"):
        (stopped / name).write_text((fit_dir / name).read_text().replace('"gw"', '"lw"'))
    probe_dir = tmp_path / "probes" / "toy"
    probe_dir.mkdir(parents=True)
    (probe_dir / "metrics.json").write_text(json.dumps({
        "metric": "accuracy", "best_layer": {"timestep": "t47", "layer": "a", "val": 0.9, "test": 0.8}}))
    with open(probe_dir / "label_efficiency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["partition", "fraction", "draw", "probe", "timestep", "layer", "n_train", "metric", "value"])
        w.writeheader()
        w.writerow({"partition": "0.50x_train", "fraction": 0.5, "draw": "partition", "probe": "best layer", "timestep": "t47",
                    "layer": "a", "n_train": 6, "metric": "accuracy", "value": 0.7})
        w.writerow({"partition": "0.50x_train", "fraction": 0.5, "draw": "seed 1", "probe": "best layer", "timestep": "t47",
                    "layer": "a", "n_train": 6, "metric": "accuracy", "value": 0.6})

    totals = write_report(tmp_path / "reports", tmp_path / "experiments", tmp_path / "probes", tmp_path / "cache")
    assert totals == {"extraction_unet_passes": 160, "fit_unet_passes": 0, "unet_passes_spent": 160,
                      "reference_unet_passes": 800, "ratio": 5.0, "extraction_vae_passes": 16, "bytes_stored": 16000,
                      "fits": 1}
    with open(tmp_path / "reports" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], r["fuser"], r["seed"], r["partition"], r["value"]) for r in rows] == [
        ("fit", "gw", "42", "default", "0.75"),
        ("probe", "best_layer (t47, a)", "", "default", "0.8"),
        ("label_efficiency", "best_layer (t47, a)", "", "0.50x_train", "0.7"),
        ("label_efficiency", "best_layer (t47, a)", "1", "0.50x_train", "0.6"),
    ]
    assert rows[0]["reference_unet_passes"] == "800" and rows[0]["unet_passes"] == "0"
    md = (tmp_path / "reports" / "summary.md").read_text()
    assert "| toy | gw | 42 | accuracy | 0.7500 | 3 | 1.5 | 0 | 800 |" in md
    assert "UNet passes spent: **160**" in md and "ratio: **5.0×**" in md
    assert json.loads((tmp_path / "reports" / "ledger.json").read_text()) == totals
