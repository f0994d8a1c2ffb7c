"""Plots of a fit, as PNG (for reading) and CSV (for `dvc plots`, which renders offline as JSON).

Files in ``<out_dir>/plots/``: ``curves.png`` + ``history.csv`` (one level up); ``fusion.png`` +
``fusion.csv`` (GW weights or LW mean gates per timestep x layer, or MoE expert usage per scale);
``confusion.png`` + ``confusion.csv`` (classification) or ``iou.png`` + ``iou.csv`` (segmentation).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(out_dir: Path, result, model, aux: dict) -> None:
    folder = Path(out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    _curves(plt, folder, result.history, result.metrics["selection_metric"])
    if "weights" in aux:
        _fusion_table(plt, folder, aux["weights"], model.fuser.timesteps, model.fuser.layers, model.config.fuser)
    if "expert_usage" in aux:
        _expert_usage(plt, folder, aux["expert_usage"], list(model.fuser.scales))
    test = result.metrics["test"]
    if "iou" in test:
        _iou(plt, folder, test["iou"])
    elif "confusion_matrix" in test:
        _confusion(plt, folder, np.asarray(test["confusion_matrix"]))


def _curves(plt, folder: Path, history: list, select: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["train_loss"] for r in history], label="train loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    evals = [(r["step"], r[f"val_{select}"]) for r in history if f"val_{select}" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label=f"val {select}")
        ax2.set_ylabel(f"val {select}")
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)


def _fusion_table(plt, folder: Path, table: np.ndarray, timesteps, layers, kind: str) -> None:
    with open(folder / "fusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestep", "layer", "weight"])
        for ti, t in enumerate(timesteps):
            for li, layer in enumerate(layers):
                w.writerow([t, layer, f"{table[ti, li]:.6g}"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 2 + 0.4 * len(timesteps)))
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), [l.replace("up_blocks_", "") for l in layers], rotation=90, fontsize=7)
    ax.set_yticks(range(len(timesteps)), timesteps)
    ax.set_title("GW mixing weights" if kind == "gw" else "LW mean gate (validation)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "fusion.png", dpi=110)
    plt.close(fig)


def _expert_usage(plt, folder: Path, usage: np.ndarray, scales) -> None:
    with open(folder / "fusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scale", "expert", "usage"])
        for si, s in enumerate(scales):
            for e, u in enumerate(usage[si]):
                w.writerow([s, e, f"{u:.6g}"])
    fig, ax = plt.subplots(figsize=(6, 2 + 0.4 * len(scales)))
    im = ax.imshow(usage, aspect="auto", cmap="magma")
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(scales)), [f"{s}x{s}" for s in scales])
    ax.set_title("MoE expert usage (validation)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "fusion.png", dpi=110)
    plt.close(fig)


def _confusion(plt, folder: Path, cm: np.ndarray) -> None:
    with open(folder / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for a in range(len(cm)):
            for p in range(len(cm)):
                w.writerows([[a, p]] * int(cm[a, p]))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for (a, p), n in np.ndenumerate(cm):
        ax.text(p, a, str(n), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(folder / "confusion.png", dpi=110)
    plt.close(fig)


def _iou(plt, folder: Path, iou: list) -> None:
    with open(folder / "iou.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou"])
        w.writerows([[c, f"{v:.6g}"] for c, v in enumerate(iou)])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(iou)), iou)
    ax.set_xlabel("class")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("test IoU per class")
    fig.tight_layout()
    fig.savefig(folder / "iou.png", dpi=110)
    plt.close(fig)
