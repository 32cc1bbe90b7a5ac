"""SegmentationMetric against hand-computed values and an independent transcription of
mmsegmentation's ``intersect_and_union`` / ``mean_iou`` (histogram based)."""
import math

import numpy as np
import pytest
import torch

from semask.metrics import SegmentationMetric, confusion_matrix, format_metrics_table, metrics_from_confusion


def mmseg_mean_iou(results, gts, num_classes, ignore_index=255, reduce_zero_label=False):
    """mmseg 0.11 ``mean_iou`` written out with numpy histograms (the reference formula)."""
    ti, tu, tp, tl = (np.zeros(num_classes) for _ in range(4))
    for pred, label in zip(results, gts):
        label = label.astype(np.int64).copy()
        if reduce_zero_label:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        a_i = np.histogram(inter, bins=num_classes, range=(0, num_classes - 1))[0]
        a_p = np.histogram(pred, bins=num_classes, range=(0, num_classes - 1))[0]
        a_l = np.histogram(label, bins=num_classes, range=(0, num_classes - 1))[0]
        ti += a_i; tp += a_p; tl += a_l; tu += a_p + a_l - a_i  # noqa: E702
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc = ti / tu, ti / tl
    return ti.sum() / tl.sum(), acc, iou


def test_hand_checked_case_with_ignore():
    label = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    m = SegmentationMetric(3)
    m.update(pred, label)
    r = m.compute()
    # valid pixels: (t0,p0) (t0,p1) (t1,p1) (t1,p1) (t2,p0); the ignored pixel predicted 2 is skipped
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert torch.allclose(r["IoU"], torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert torch.allclose(r["Acc"], torch.tensor([1 / 2, 1.0, 0.0], dtype=torch.float64))
    assert math.isclose(float(r["aAcc"]), 3 / 5)
    assert math.isclose(float(r["mIoU"]), 1 / 3)
    assert math.isclose(float(r["mAcc"]), 1 / 2)


def test_absent_and_predicted_only_classes():
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 predicted but absent from GT; class 3 absent from both
    r = metrics_from_confusion(confusion_matrix(pred, label, 4))
    assert r["IoU"][2] == 0 and torch.isnan(r["Acc"][2])
    assert torch.isnan(r["IoU"][3]) and torch.isnan(r["Acc"][3])
    assert math.isclose(float(r["mIoU"]), (0.5 + 1.0 + 0.0) / 3)  # nanmean skips class 3 only


def test_reduce_zero_label_hand_checked():
    raw = torch.tensor([[0, 1, 2], [3, 255, 1]])  # -> [[255, 0, 1], [2, 255, 0]]
    pred = torch.tensor([[2, 0, 1], [1, 0, 0]])
    cm = confusion_matrix(pred, raw, 3, reduce_zero_label=True)
    assert cm.tolist() == [[2, 0, 0], [0, 1, 0], [0, 1, 0]]


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_matches_mmseg_formula_streaming(reduce_zero_label):
    g = torch.Generator().manual_seed(0)
    k = 6
    metric = SegmentationMetric(k, reduce_zero_label=reduce_zero_label)
    preds, gts = [], []
    for _ in range(4):
        hi = k + 1 if reduce_zero_label else k
        gt = torch.randint(0, hi, (17, 23), generator=g)
        gt[torch.rand(17, 23, generator=g) < 0.2] = 255
        pred = torch.where(torch.rand(17, 23, generator=g) < 0.6, (gt - int(reduce_zero_label)).clamp(0, k - 1),
                           torch.randint(0, k, (17, 23), generator=g))
        pred[pred == 5] = 4  # class 5 never predicted
        metric.update(pred, gt.numpy())  # tensors and arrays both accepted
        preds.append(pred.numpy()); gts.append(gt.numpy())  # noqa: E702
    aacc, acc, iou = mmseg_mean_iou(preds, gts, k, reduce_zero_label=reduce_zero_label)
    r = metric.compute()
    np.testing.assert_allclose(r["IoU"].numpy(), iou, equal_nan=True)
    np.testing.assert_allclose(r["Acc"].numpy(), acc, equal_nan=True)
    assert math.isclose(float(r["aAcc"]), aacc)
    assert math.isclose(float(r["mIoU"]), np.nanmean(iou))
    assert math.isclose(float(r["mAcc"]), np.nanmean(acc))


def test_bad_inputs_and_table():
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match="outside 0..2"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))
    with pytest.raises(TypeError, match="argmax"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    table = format_metrics_table(m.compute(), ["a", "b", "c"])
    assert table.splitlines()[-1] == "mIoU: 100.00" and "nan" in table
