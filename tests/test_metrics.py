import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from pipeline.metrics import Accumulator, classification_metrics, confusion, multilabel_metrics, segmentation_metrics


def test_classification_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))  # class 3 never predicted wrongly...
    p[p == 3] = 2  # ...and never predicted at all
    m = classification_metrics(y, p, 4)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    prec = skm.precision_score(y, p, average="macro", zero_division=0, labels=range(4))
    rec = skm.recall_score(y, p, average="macro", zero_division=0, labels=range(4))
    assert m["macro_precision"] == pytest.approx(prec) and m["macro_recall"] == pytest.approx(rec)
    assert m["f1_of_macro_pr"] == pytest.approx(2 * prec * rec / (prec + rec))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0, labels=range(4)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p, labels=range(4)).tolist()


def test_multilabel_metrics_equal_scikit_learn_micro_at_half():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (50, 6))
    logits = rng.normal(size=(50, 6)) + (y - 0.5) * 2
    pred = (logits > 0).astype(int)
    m = multilabel_metrics(y, logits)
    assert m["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert m["micro_precision"] == pytest.approx(skm.precision_score(y, pred, average="micro"))


def test_segmentation_metrics_equal_scikit_learn_over_all_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, (4, 16, 16))
    y[y == 4] = 3  # class 4 ("no data") never occurs: IoU 0 and still averaged, as the reference
    p = np.where(rng.random(y.shape) < 0.7, y, rng.integers(0, 5, y.shape))
    m = segmentation_metrics(confusion(y, p, 5))
    iou = skm.jaccard_score(y.ravel(), p.ravel(), labels=range(5), average=None, zero_division=0)
    np.testing.assert_allclose(m["iou"], iou, atol=1e-6)
    assert m["miou"] == pytest.approx(iou.mean(), abs=1e-6)
    assert m["pixel_accuracy"] == pytest.approx(skm.accuracy_score(y.ravel(), p.ravel()))
    ignoring = segmentation_metrics(confusion(y, p, 5), ignore_index=4)
    assert ignoring["miou"] == pytest.approx(iou[:4].mean(), abs=1e-6)


def test_segmentation_precision_and_recall_equal_scikit_learn_and_the_references_are_swapped():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, (2, 16, 16))
    p = np.where(rng.random(y.shape) < 0.5, y, 0)  # over-predicts class 0: its precision and recall differ
    m = segmentation_metrics(confusion(y, p, 3))
    prec, rec, _, _ = skm.precision_recall_fscore_support(y.ravel(), p.ravel(), labels=range(3), zero_division=0)
    np.testing.assert_allclose(m["precision"], prec, atol=1e-6)
    np.testing.assert_allclose(m["recall"], rec, atol=1e-6)
    # The reference counts pred * K + label, so its matrix is (pred, label), and divides by the column
    # sums (the true pixels) for what it calls precision: that is recall, and its recall is precision.
    theirs = np.bincount((p * 3 + y).ravel(), minlength=9).reshape(3, 3).astype(float)
    tp = np.diag(theirs)
    np.testing.assert_allclose(tp / (theirs.sum(axis=0) + 1e-6), rec, atol=1e-6)
    np.testing.assert_allclose(tp / (theirs.sum(axis=1) + 1e-6), prec, atol=1e-6)
    assert abs(prec[0] - rec[0]) > 0.1


def test_accumulator_over_batches_drops_the_ignored_label():
    acc = Accumulator("segmentation", 3, ignore_index=2)
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 1] = 1.0  # predicts class 1 everywhere
    labels = torch.ones(2, 4, 4, dtype=torch.long)
    labels[0] = 2  # ignored pixels
    acc.update(logits[:1], labels[:1])
    acc.update(logits[1:], labels[1:])
    m = acc.compute()
    assert m["pixel_accuracy"] == 1.0 and m["confusion_matrix"][1][1] == 16
