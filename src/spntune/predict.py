"""Inference with a trained pipeline: load it from a checkpoint (or a trial's MLflow run) and write
palette masks and overlays at each image's original size. Used by ``spntune predict``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spntune.config import TrialConfig
from spntune.data.base import DatasetError, read_image, to_tensors
from spntune.data.transforms import build_transform
from spntune.models import RefinedSegmenter
from spntune.tracking import download_checkpoint
from spntune.trainables import load_checkpoint, restore_model
from spntune.viz import PALETTE, colourise

__all__ = ["Pipeline", "load_pipeline", "predict_images"]


@dataclass
class Pipeline:
    """A trained coarse network + refiner with the config and class names it was trained with."""

    model: RefinedSegmenter
    cfg: TrialConfig
    class_names: list[str]


def load_pipeline(checkpoint: str | Path | None = None, run_id: str | None = None,
                  tracking_uri: str | None = None) -> Pipeline:  # fmt: skip
    """From a checkpoint file or folder, or from a trial run's best checkpoint in MLflow.

    Raises:
        FileNotFoundError: no checkpoint there (or the run has none).
        CheckpointError: not a spntune checkpoint, or one whose config or weights do not fit.
    """
    with tempfile.TemporaryDirectory(prefix="spntune-predict-") as tmp:
        path = download_checkpoint(tracking_uri or "", run_id, Path(tmp)) if run_id else Path(checkpoint or "")
        state = load_checkpoint(path)
    cfg, model = restore_model(state, run_id or path)
    return Pipeline(model.eval(), cfg, list(state["extra"]["class_names"]))


@torch.no_grad()
def predict_images(pipeline: Pipeline, images: list[Path], out_dir: Path) -> list[tuple[Path, Path, Path]]:
    """``<stem>_mask.png`` (palette PNG of class ids) and ``<stem>_overlay.png`` per image, at the image's
    original size, plus ``classes.txt``. Returns ``(image, mask, overlay)`` per image."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:  # refuse before writing anything
        raise DatasetError(f"image not found: {', '.join(missing)}")
    transform = build_transform(pipeline.cfg.data.image_size, train=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = PALETTE.flatten().tolist()
    written = []
    for image_path in images:
        image = read_image(image_path)
        x, _ = to_tensors(image, np.zeros(image.shape[:2], np.uint8), transform)
        pred = pipeline.model(x.unsqueeze(0)).refined_logits.argmax(1)[0].numpy().astype(np.uint8)
        mask = Image.fromarray(pred, mode="P").resize((image.shape[1], image.shape[0]), Image.NEAREST)
        mask.putpalette(palette)
        mask_path, overlay_path = out_dir / f"{image_path.stem}_mask.png", out_dir / f"{image_path.stem}_overlay.png"
        mask.save(mask_path)
        Image.fromarray((0.5 * image + 0.5 * colourise(np.asarray(mask))).astype(np.uint8)).save(overlay_path)
        written.append((image_path, mask_path, overlay_path))
    (out_dir / "classes.txt").write_text("\n".join(pipeline.class_names) + "\n")
    return written
