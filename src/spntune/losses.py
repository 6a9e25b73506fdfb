"""Segmentation losses by name, all honouring ignore index 255.

A loss spec is a name (``"ce"``) or a weighted sum written ``"ce+dice"`` or ``"ce+0.5*dice"``.
Each loss takes logits ``[B, C, H, W]`` and targets ``[B, H, W]`` (int64, 255 = void).
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
    safe = target.masked_fill(target == IGNORE_INDEX, 0).view(b, -1)
    one_hot = F.one_hot(safe, c).permute(0, 2, 1).float()
    return probs * valid, one_hot * valid, valid


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Pixel-mean cross-entropy over non-void pixels (0 if every pixel is void)."""
    if (target != IGNORE_INDEX).any():
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
    return logits.sum() * 0.0


def soft_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - mean_c (2|P∩G| + s) / (|P| + |G| + s)`` over classes present in the batch target."""
    probs, one_hot, _ = _valid_one_hot(logits, target)
    inter = (probs * one_hot).sum(dim=(0, 2))
    total = probs.sum(dim=(0, 2)) + one_hot.sum(dim=(0, 2))
    dice = (2 * inter + smooth) / (total + smooth)
    present = one_hot.sum(dim=(0, 2)) > 0
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0.0


def soft_jaccard(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - mean_c (|P∩G| + s) / (|P∪G| + s)`` (soft IoU) over classes present in the target."""
    probs, one_hot, _ = _valid_one_hot(logits, target)
    inter = (probs * one_hot).sum(dim=(0, 2))
    union = probs.sum(dim=(0, 2)) + one_hot.sum(dim=(0, 2)) - inter
    iou = (inter + smooth) / (union + smooth)
    present = one_hot.sum(dim=(0, 2)) > 0
    return 1 - iou[present].mean() if present.any() else logits.sum() * 0.0


def focal(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma log p_t``, mean over non-void pixels."""
    valid = target != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    log_p = logits.float().log_softmax(dim=1)
    safe = target.masked_fill(~valid, 0).unsqueeze(1)
    log_pt = log_p.gather(1, safe).squeeze(1)[valid]
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(logits: Tensor, target: Tensor) -> Tensor:
    """Lovász-softmax (Berman et al. 2018) over the batch, classes present in the target."""
    c = logits.shape[1]
    probs = logits.float().softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    labels = target.reshape(-1)
    valid = labels != IGNORE_INDEX
    probs, labels = probs[valid], labels[valid]
    losses = []
    for cls in range(c):
        fg = (labels == cls).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, cls]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


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
