"""Segmentation losses by name, all honouring ignore index 255.

A loss spec is a name (``"ce"``) or a weighted sum written ``"ce+dice"`` or ``"ce+0.5*dice"``.
Each loss takes logits ``[B, C, H, W]`` and targets ``[B, H, W]`` (int64, 255 = void).

No loss reads a value back to the host: no ``.item()``, no boolean indexing, no ``if`` on a tensor. On a
GPU each would wait until the device had run everything queued, once per batch; the training loop
(``trainables._train_epoch``) then queues batch after batch without waiting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spntune.data.base import IGNORE_INDEX
from spntune.names import parse_loss_spec

__all__ = ["LOSSES", "CompositeLoss", "build_loss", "parse_loss_spec"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _valid_one_hot(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax probs ``[B, C, N]``, one-hot target ``[B, C, N]`` and valid mask ``[B, 1, N]``."""
    b, c = logits.shape[:2]
    probs = logits.float().softmax(dim=1).view(b, c, -1)
    valid = (target != IGNORE_INDEX).view(b, 1, -1)
    return probs * valid, _one_hot(target.view(b, 1, -1), c) * valid, valid


def _one_hot(labels: Tensor, c: int) -> Tensor:
    """``labels`` (a size-1 axis second to last, ``[..., 1, N]``) as ``[..., C, N]`` float 0 / 1; void (255)
    is no class. By ``==`` against the class ids, not ``F.one_hot``: on the CPU that checks the ids' range
    with two reads back to the host."""
    return (labels == torch.arange(c, device=labels.device).view(c, 1)).float()


def _present_mean(per_class: Tensor, present: Tensor, logits: Tensor) -> Tensor:
    """Mean of ``per_class`` over the ``present`` classes, 0 (still a function of ``logits``) where none is,
    without reading anything back to the host."""
    count = present.sum()
    mean = (per_class * present).sum() / count.clamp_min(1)
    return torch.where(count > 0, mean, logits.sum() * 0.0)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Pixel-mean cross-entropy over non-void pixels (0 if every pixel is void)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def soft_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - mean_c (2|P∩G| + s) / (|P| + |G| + s)`` over classes present in the batch target."""
    probs, one_hot, _ = _valid_one_hot(logits, target)
    inter = (probs * one_hot).sum(dim=(0, 2))
    total = probs.sum(dim=(0, 2)) + one_hot.sum(dim=(0, 2))
    dice = (2 * inter + smooth) / (total + smooth)
    return _present_mean(1 - dice, one_hot.sum(dim=(0, 2)) > 0, logits)


def soft_jaccard(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - mean_c (|P∩G| + s) / (|P∪G| + s)`` (soft IoU) over classes present in the target."""
    probs, one_hot, _ = _valid_one_hot(logits, target)
    inter = (probs * one_hot).sum(dim=(0, 2))
    union = probs.sum(dim=(0, 2)) + one_hot.sum(dim=(0, 2)) - inter
    iou = (inter + smooth) / (union + smooth)
    return _present_mean(1 - iou, one_hot.sum(dim=(0, 2)) > 0, logits)


def focal(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma log p_t``, mean over non-void pixels."""
    valid = target != IGNORE_INDEX
    log_p = logits.float().log_softmax(dim=1)
    log_pt = log_p.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    # void pixels get log p_t = -1 before the power: at p_t = 1 its derivative is infinite for gamma < 1,
    # and torch.where's zero gradient times that would be NaN
    log_pt = torch.where(valid, log_pt, -1.0)
    terms = torch.where(valid, -((1 - log_pt.exp()) ** gamma) * log_pt, 0.0)
    return terms.sum() / valid.sum().clamp_min(1)


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """The Lovász extension's gradient for each row of ``gt_sorted`` (0/1, sorted by descending error)."""
    gts = gt_sorted.sum(dim=-1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(-1)
    union = gts + (1 - gt_sorted).cumsum(-1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)


def lovasz_softmax(logits: Tensor, target: Tensor) -> Tensor:
    """Lovász-softmax (Berman et al. 2018) over the batch, classes present in the target.

    All classes in one sort of ``[C, N]`` errors. A void pixel has error 0 and is not foreground: it sorts
    after every pixel of non-zero error, so it changes no term the loss sums (a term of error 0 adds 0).
    The loss is ``sum_i errors_i * w_i`` with ``w`` the Lovász gradient of the sorted foreground, put back
    in pixel order: ``w`` is piecewise constant in the errors, so it is computed without autograd and the
    sort's indices are not kept for the backward.

    The price of not reading back which classes are present: the backward keeps 12 bytes per class and
    pixel for all C classes (the softmax output, the errors' input, ``w``), where sorting the present
    classes one by one kept 7.6 per class and pixel at 5 of 21 classes present. Measured with saved-tensor
    hooks at [8, 21, 128, 128] and scaled to 512x512: 0.53 GB per loss call against 0.33 GB."""
    c = logits.shape[1]
    probs = logits.float().softmax(dim=1).transpose(0, 1).reshape(c, -1)
    labels = target.reshape(1, -1)
    fg = _one_hot(labels, c)
    errors = torch.where(labels != IGNORE_INDEX, (fg - probs).abs(), 0.0)
    with torch.no_grad():
        order = errors.argsort(dim=1, descending=True)
        weights = torch.empty_like(errors).scatter_(1, order, _lovasz_grad(fg.gather(1, order)))
    per_class = (errors * weights).sum(dim=1)
    return _present_mean(per_class, fg.sum(dim=1) > 0, logits)


#: Losses by the names used in configs and search spaces.
LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy,
    "dice": soft_dice,
    "focal": focal,
    "lovasz": lovasz_softmax,
    "jaccard": soft_jaccard,
}


class CompositeLoss(nn.Module):
    """Weighted sum of registry losses; ``forward`` returns the scalar total."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = spec
        self.terms = parse_loss_spec(spec)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return sum(w * LOSSES[name](logits, target) for w, name in self.terms)  # type: ignore[return-value]


def build_loss(spec: str) -> CompositeLoss:
    return CompositeLoss(spec)
