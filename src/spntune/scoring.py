"""Scores at each image's original size: the model runs at the training size, its *logits* are
upsampled bilinearly to the image's own size, and the argmax is taken there. Used by a trial's final
evaluation of its best epoch (``final_*`` metrics), ``spntune evaluate`` and ``spntune predict``, so
the three agree exactly."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from spntune.data.base import PairTransform, to_tensors
from spntune.leaderboard import class_key
from spntune.metrics import SegmentationMeter, class_ids

__all__ = ["flat_metrics", "predict_at_original_size", "score_at_original_size"]


def flat_metrics(results: dict[str, Any], class_names: list[str]) -> dict[str, float]:
    """Flatten evaluation results to scalar metric names (what Ray and MLflow store)."""
    out: dict[str, float] = {}
    for stream in ("coarse", "refined"):
        r = results[stream]
        for key in ("miou", "pixel_acc", "mean_dice", "boundary_iou"):
            out[f"{stream}_{key}"] = r[key]
        for name, iou in zip(class_names, r["per_class_iou"], strict=True):
            out[f"{stream}_iou_{class_key(name)}"] = iou
    out["refined_miou_gain"] = out["refined_miou"] - out["coarse_miou"]
    for t, miou in enumerate(results["steps_miou"]):
        out[f"refined_miou_t{t}"] = miou
    out["val_loss"] = results["val_loss"]
    out["infer_ms_per_image"] = results["infer_ms_per_image"]
    return out


@torch.no_grad()
def predict_at_original_size(
    model: nn.Module,
    transform: PairTransform,
    image: np.ndarray,
    steps: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Class ids at the image's own size: ``coarse``, ``refined`` and, with ``steps``, ``step_<t>``
    for h^0..h^T.

    Shape:
        image ``[H, W, 3]`` uint8 -> ``{name: [H, W] int64}`` (on the CPU).
    """
    x, _ = to_tensors(image, np.zeros(image.shape[:2], np.uint8), transform)
    out = model(x.unsqueeze(0).to(device), return_steps=steps)
    logits = {"coarse": out.coarse_logits, "refined": out.refined_logits}
    logits |= {f"step_{t}": step for t, step in enumerate(out.steps)} if steps else {}
    size = image.shape[:2]
    return {k: class_ids(F.interpolate(v.float(), size=size, mode="bilinear", align_corners=False))[0].cpu()
            for k, v in logits.items()}  # fmt: skip


def score_at_original_size(
    model: nn.Module, transform: PairTransform, dataset: Dataset, class_names: list[str],
    device: str | torch.device = "cpu",
) -> dict[str, float]:  # fmt: skip
    """Flat metrics (named as a trial reports them, without ``val_loss``) over a dataset's images at
    their original sizes, from dataset-level confusion matrices (void = 255 ignored); plus ``images``.

    ``dataset`` is a file dataset (or a ``Subset`` of one) with ``load_raw(i)``.
    """
    base, indices = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else (dataset, None)
    indices = indices if indices is not None else list(range(len(base)))  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    meters = {"coarse": SegmentationMeter(len(class_names)), "refined": SegmentationMeter(len(class_names))}
    steps: list[SegmentationMeter] = []
    seconds = 0.0
    for i in indices:
        image, mask = base.load_raw(i)  # type: ignore[attr-defined]
        target = torch.from_numpy(mask.astype(np.int64)).unsqueeze(0)
        t0 = time.perf_counter()
        preds = predict_at_original_size(model, transform, image, steps=True, device=device)
        seconds += time.perf_counter() - t0
        for name, meter in meters.items():
            meter.update(preds[name].unsqueeze(0), target)
        step_preds = [preds[f"step_{t}"] for t in range(sum(k.startswith("step_") for k in preds))]
        steps = steps or [SegmentationMeter(len(class_names), boundary=False) for _ in step_preds]
        for meter, pred in zip(steps, step_preds, strict=True):
            meter.update(pred.unsqueeze(0), target)
    model.train(was_training)
    results = {"coarse": meters["coarse"].compute(), "refined": meters["refined"].compute(),
               "steps_miou": [m.compute()["miou"] for m in steps], "val_loss": math.nan,
               "infer_ms_per_image": 1000 * seconds / max(len(indices), 1)}  # fmt: skip
    metrics = {k: v for k, v in flat_metrics(results, class_names).items() if k != "val_loss"}
    return {**metrics, "images": float(len(indices))}
