"""Inference with a trained pipeline at each image's original size: load it from a checkpoint (or a
trial's MLflow run), write palette masks and overlays (``spntune predict``) or score a dataset split
(``spntune evaluate``). Both resize the image to the training size, run the model, upsample the
*logits* bilinearly back to the image's size and only then take the argmax, so the masks ``predict``
writes score exactly what ``evaluate`` reports (and are not blocky)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spntune.config import DataConfig, TrialConfig
from spntune.data import build_datasets
from spntune.data.base import DatasetError, read_image
from spntune.data.transforms import build_transform
from spntune.models import RefinedSegmenter
from spntune.scoring import predict_at_original_size, score_at_original_size
from spntune.tracking import download_checkpoint
from spntune.trainables import load_checkpoint, restore_model
from spntune.viz import PALETTE, colourise

__all__ = ["Pipeline", "evaluate_split", "load_pipeline", "predict_images"]


@dataclass
class Pipeline:
    """A trained coarse network + refiner with the config and class names it was trained with."""

    model: RefinedSegmenter
    cfg: TrialConfig
    class_names: list[str]

    @property
    def transform(self) -> Any:
        """The validation transform: a resize to the training size."""
        return build_transform(self.cfg.data.image_size, train=False)


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


def predict_images(pipeline: Pipeline, images: list[Path], out_dir: Path) -> list[tuple[Path, Path, Path]]:
    """``<stem>_mask.png`` (palette PNG of class ids) and ``<stem>_overlay.png`` per image, at the image's
    original size, plus ``classes.txt``. Returns ``(image, mask, overlay)`` per image."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:  # refuse before writing anything
        raise DatasetError(f"image not found: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = PALETTE.flatten().tolist()
    written = []
    for image_path in images:
        image = read_image(image_path)
        pred = predict_at_original_size(pipeline.model, pipeline.transform, image)["refined"].numpy().astype(np.uint8)
        mask = Image.fromarray(pred, mode="P")
        mask.putpalette(palette)
        mask_path, overlay_path = out_dir / f"{image_path.stem}_mask.png", out_dir / f"{image_path.stem}_overlay.png"
        mask.save(mask_path)
        Image.fromarray((0.5 * image + 0.5 * colourise(pred)).astype(np.uint8)).save(overlay_path)
        written.append((image_path, mask_path, overlay_path))
    (out_dir / "classes.txt").write_text("\n".join(pipeline.class_names) + "\n")
    return written


def evaluate_split(pipeline: Pipeline, data: DataConfig, split: str | None = None) -> dict[str, Any]:
    """Score the pipeline on a split (default: the validation split) at each image's original size.

    Returns flat metrics named as a trial reports them (``coarse_miou``, ``refined_boundary_iou``,
    ``refined_iou_<class>``, ``refined_miou_t<t>``, ...), ``images``, and ``class_names``.
    """
    data = data.model_copy(update={"val_split": split}) if split else data
    _, val, class_names = build_datasets(data, pipeline.cfg.train.seed)
    return {**score_at_original_size(pipeline.model, pipeline.transform, val, class_names), "class_names": class_names}
