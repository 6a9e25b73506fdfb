import math

import pytest
import torch
import torch.nn.functional as F

from spntune.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    boundary_band,
    boundary_width,
    class_ids,
    confusion_matrix,
    scores_from_confusion,
)


def test_class_ids_by_hand_first_maximum_on_ties_and_nan_wins():
    # [1, 3, 1, 4]: pixel 0 class 1; pixel 1 a tie of classes 0 and 2 (the first); pixel 2 a NaN in class 2;
    # pixel 3 NaN in classes 1 and 2 (the first NaN)
    nan = math.nan
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [1.0, 2.0, 0.0, nan], [0.0, 5.0, nan, nan]]).view(1, 3, 1, 4)
    assert class_ids(logits).tolist() == [[[1, 0, 2, 1]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_class_ids_equal_argmax(dtype):
    """Integer-valued scores (ties everywhere) with NaNs, contiguous and channels-last, as argmax(1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 11, 9, 13), generator=g).to(dtype)
    logits[0, 4, 3, 3] = logits[1, 2, 0, 5] = logits[1, 9, 0, 5] = math.nan
    for x in (logits, logits.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(class_ids(x), x.argmax(1))


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, target, 3)
    # rows = target: class 0 -> (0,1); class 1 -> (1,1,1); class 2 -> (2,0); void skipped
    assert cm.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    s = scores_from_confusion(cm)
    iou = [1 / 3, 3 / 4, 1 / 2]  # tp / (tp + fp + fn)
    assert s["per_class_iou"] == pytest.approx(iou)
    assert s["miou"] == pytest.approx(sum(iou) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 7)
    assert s["mean_dice"] == pytest.approx((2 / 4 + 6 / 7 + 2 / 3) / 3)


def test_absent_class_is_excluded_from_the_mean():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 1, 0]])
    s = scores_from_confusion(confusion_matrix(pred, target, 4))  # classes 2, 3 absent everywhere
    assert math.isnan(s["per_class_iou"][2]) and math.isnan(s["per_class_iou"][3])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_predicted_but_absent_class_counts_as_zero():
    target = torch.tensor([[0, 0, 0, 0]])
    pred = torch.tensor([[0, 0, 0, 2]])
    s = scores_from_confusion(confusion_matrix(pred, target, 3))
    assert s["per_class_iou"][2] == 0.0
    assert s["miou"] == pytest.approx((3 / 4 + 0) / 2)


def test_dataset_level_not_mean_of_batches():
    meter = ConfusionMatrix(2)
    # batch 1: tiny image, perfect; batch 2: big image, class 1 IoU 0.5
    meter.update(torch.tensor([[1]]), torch.tensor([[1]]))
    meter.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 0]]))
    s = meter.compute()
    # pooled: class 0 tp=2 fn=1 -> 2/3; class 1 tp=2 fp=1 -> 2/3
    assert s["miou"] == pytest.approx(2 / 3)


def test_all_ignore_image():
    meter = ConfusionMatrix(3)
    meter.update(torch.tensor([[1, 2]]), torch.tensor([[255, 255]]))
    s = meter.compute()
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_acc"])
    meter.update(torch.tensor([[1, 1]]), torch.tensor([[1, 255]]))
    assert meter.compute()["miou"] == 1.0


def test_out_of_range_ids_are_rejected():
    with pytest.raises(ValueError, match="target has class ids outside 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="target has class ids outside 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 3)
    with pytest.raises(ValueError, match="pred has class ids outside 0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="pred has class ids outside 0..2"):
        confusion_matrix(torch.tensor([-1, 1]), torch.tensor([0, 1]), 3)
    # a prediction where the target is void is not scored, so not checked either
    assert confusion_matrix(torch.tensor([0, 9]), torch.tensor([0, 255]), 3).tolist() == [
        [1, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
    ]
    assert confusion_matrix(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 2).tolist() == [
        [0, 0], [0, 0]]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_confusion_matrix_counts_every_valid_pixel_once(dtype):
    """Against counting pixel by pixel, with void pixels (255) spread through the batch."""
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (3, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, 5, (3, 17, 23), generator=g)
    expected = [[0] * 5 for _ in range(5)]
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != 255:
            expected[t][p] += 1
    assert confusion_matrix(pred.to(dtype), target.to(dtype), 5).tolist() == expected


def test_boundary_band_by_hand():
    mask = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    mask[0, 0, 1:6, 1:6] = True  # 5x5 square
    band = boundary_band(mask, 1)
    expected = mask.clone()
    expected[0, 0, 2:5, 2:5] = False  # inner 3x3 is farther than 1 px from the contour
    assert torch.equal(band, expected)
    full = torch.ones(1, 1, 5, 5, dtype=torch.bool)  # the image edge counts as contour
    assert boundary_band(full, 1).sum() == 16


def _reference_band(masks: torch.Tensor, d: int) -> torch.Tensor:
    """Boundary IoU's definition: mask minus its erosion by a 3x3 square, d times, outside the image
    counting as background (the reference code pads with zeros before each erosion)."""
    b, c, h, w = masks.shape
    eroded = masks.float().reshape(b * c, 1, h, w)
    for _ in range(d):
        eroded = -F.max_pool2d(-F.pad(eroded, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return masks & ~(eroded.view(b, c, h, w) > 0.5)


@pytest.mark.parametrize(("h", "w", "d"), [(7, 9, 1), (20, 13, 2), (64, 50, 5), (40, 60, 13), (30, 31, 20), (5, 40, 3)])
def test_boundary_band_equals_repeated_3x3_erosion(h, w, d):
    g = torch.Generator().manual_seed(h * w + d)
    blocks = torch.randint(0, 4, (2, h // 3 + 1, w // 3 + 1), generator=g)
    labels = blocks.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :h, :w]
    labels[0, h // 2, w // 2] = 3  # a lone pixel
    masks = labels.unsqueeze(1) == torch.arange(5).view(1, -1, 1, 1)  # class 4 is absent: an empty mask
    masks = torch.cat([masks, torch.ones_like(masks[:, :1])], dim=1)  # and a full one
    assert torch.equal(boundary_band(masks, d), _reference_band(masks, d))


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width(192, 256) == 6  # diag 320
    assert boundary_width(10, 10) == 1


def test_boundary_iou_by_hand():
    # 60x80 image (d = 2), a 20x20 square truth and the same square shifted right by 2 px
    target = torch.zeros(1, 60, 80, dtype=torch.long)
    target[0, 20:40, 20:40] = 1
    pred = torch.zeros_like(target)
    pred[0, 20:40, 22:42] = 1
    m = BoundaryIoU(2)
    m.update(pred, target)
    gt_band = boundary_band((target == 1).unsqueeze(1), 2)
    pr_band = boundary_band((pred == 1).unsqueeze(1), 2)
    expected = (gt_band & pr_band).sum() / (gt_band | pr_band).sum()
    assert m.compute()["per_class_boundary_iou"][1] == pytest.approx(float(expected))
    perfect = BoundaryIoU(2)
    perfect.update(target, target)
    assert perfect.compute()["boundary_iou"] == 1.0


def test_boundary_iou_ignores_void():
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[0, :, 10:] = 255
    pred = torch.zeros_like(target)
    pred[0, :, 10:] = 1  # all predictions of class 1 fall on void pixels
    m = BoundaryIoU(2)
    m.update(pred, target)
    s = m.compute()
    assert math.isnan(s["per_class_boundary_iou"][1])
    assert s["boundary_iou"] == 1.0
