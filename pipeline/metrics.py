"""Evaluation metrics with the reference's definitions, under names that say what they are.

All values are fractions in [0, 1] (the reference prints segmentation metrics in percent).

- Classification: accuracy (the selection metric), macro precision and macro recall (per-class
  means, classes never predicted count as 0), ``f1_of_macro_pr`` = 2PR/(P+R) of those two means
  (what the reference calls F1), and scikit-learn's ``macro_f1`` (mean of per-class F1) beside it.
- Multi-label: micro precision, recall and F1 of sigmoid(logits) > 0.5 (F1 selects).
- Segmentation: per-class IoU and their mean over all classes, no-data included (mIoU selects),
  per-class precision/recall/F1, and pixel accuracy. Pixels whose label is ``ignore_index`` are left
  out, and that class (if it is one) is left out of the means.
"""

from __future__ import annotations

import numpy as np
import torch

SELECTION = {"classification": "accuracy", "multi_label_classification": "micro_f1", "segmentation": "miou"}


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    idx = labels.astype(np.int64).ravel() * num_classes + preds.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    from sklearn.metrics import f1_score

    cm = confusion(labels, preds, num_classes)
    tp = np.diag(cm).astype(np.float64)
    precision = float(np.mean(tp / (cm.sum(axis=0) + 1e-10)))
    recall = float(np.mean(tp / (cm.sum(axis=1) + 1e-10)))
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_precision": precision,
        "macro_recall": recall,
        "f1_of_macro_pr": 2 * precision * recall / (precision + recall + 1e-10),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_classes)), average="macro", zero_division=0)),
        "confusion_matrix": cm.tolist(),
    }


def multilabel_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    preds = (1 / (1 + np.exp(-logits)) > 0.5).astype(np.uint8)
    p, r, f1, _ = precision_recall_fscore_support(labels.astype(np.uint8), preds, average="micro", zero_division=0)
    return {"micro_precision": float(p), "micro_recall": float(r), "micro_f1": float(f1)}


def segmentation_metrics(cm: np.ndarray, ignore_index: int | None = None) -> dict:
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    iou = tp / (cm.sum(axis=0) + cm.sum(axis=1) - tp + 1e-6)
    precision = tp / (cm.sum(axis=0) + 1e-6)
    recall = tp / (cm.sum(axis=1) + 1e-6)
    f1 = 2 * precision * recall / (precision + recall + 1e-6)
    keep = np.ones(len(cm), dtype=bool)
    if ignore_index is not None and 0 <= ignore_index < len(cm):
        keep[ignore_index] = False
    return {
        "miou": float(iou[keep].mean()),
        "iou": iou.tolist(),
        "mean_f1": float(f1[keep].mean()),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


class Accumulator:
    """Collects predictions batch by batch and computes a task's metrics at the end."""

    def __init__(self, task: str, num_classes: int, ignore_index: int | None = None):
        self.task, self.num_classes, self.ignore_index = task, num_classes, ignore_index
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.labels, self.outputs = [], []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        if self.task == "multi_label_classification":
            self.outputs.append(logits.numpy())
            self.labels.append(labels.numpy())
            return
        preds, labels = logits.argmax(dim=1).numpy(), labels.numpy()
        if self.ignore_index is not None:
            keep = labels != self.ignore_index
            preds, labels = preds[keep], labels[keep]
        self.cm += confusion(labels, preds, self.num_classes)
        if self.task == "classification":
            self.labels.append(labels)
            self.outputs.append(preds)

    def compute(self) -> dict:
        if self.task == "segmentation":
            return segmentation_metrics(self.cm, self.ignore_index)
        labels, outputs = np.concatenate(self.labels), np.concatenate(self.outputs)
        if self.task == "multi_label_classification":
            return multilabel_metrics(labels, outputs)
        return classification_metrics(labels, outputs, self.num_classes)
