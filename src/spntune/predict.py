"""Inference with a trained pipeline at each image's original size: load it from a checkpoint (or a
trial's MLflow run), write palette masks and overlays (``spntune predict``) or score a dataset split
(``spntune evaluate``). Both resize the image to the training size, run the model, upsample the
*logits* bilinearly back to the image's size and only then take the argmax, so the masks ``predict``
writes score exactly what ``evaluate`` reports (and are not blocky)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Subset

from spntune.config import DataConfig, TrialConfig
from spntune.data import DATASETS
from spntune.data.base import DatasetError, read_image
from spntune.data.transforms import build_transform
from spntune.models import RefinedSegmenter
from spntune.predict_input import CLASSES_FILE, check_predict_inputs, check_split, mask_name, overlay_name
from spntune.scoring import predict_at_original_size, score_at_original_size
from spntune.tracking import download_checkpoint
from spntune.trainables import load_checkpoint, restore_model
from spntune.viz import PALETTE, colourise

__all__ = ["Pipeline", "evaluate_split", "load_pipeline", "predict_images", "write_json"]


@dataclass
class Pipeline:
    """A trained coarse network + refiner with the config and class names it was trained with."""

    model: RefinedSegmenter
    cfg: TrialConfig
    class_names: list[str]
    source: str = ""  # "checkpoint PATH" or "run ID", for messages

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
    source = f"run {run_id}" if run_id else f"checkpoint {path}"
    return Pipeline(model.eval(), cfg, list(state["extra"]["class_names"]), source)


def predict_images(
    pipeline: Pipeline, images: list[Path], out_dir: Path, checked: bool = False
) -> list[tuple[Path, Path, Path]]:
    """``<stem>_mask.png`` (palette PNG of class ids) and ``<stem>_overlay.png`` per image, at the image's
    original size, plus ``classes.txt``. Returns ``(image, mask, overlay)`` per image.

    Every image is decoded, and ``out_dir`` checked, before anything is written
    (``predict_input.check_predict_inputs``), unless ``checked``: the caller ran that check already (the
    CLI does, before it loads the model), so each image is not decoded a third time.

    Raises:
        DatasetError: an image is missing, a folder, does not decode, or shares its stem with another.
        ConfigError: ``out_dir`` cannot be made or written.
    """
    if not checked:
        images = check_predict_inputs(images, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = PALETTE.flatten().tolist()
    written = []
    for image_path in images:
        image = read_image(image_path)
        pred = predict_at_original_size(pipeline.model, pipeline.transform, image)["refined"].numpy().astype(np.uint8)
        mask = Image.fromarray(pred, mode="P")
        mask.putpalette(palette)
        mask_path, overlay_path = out_dir / mask_name(image_path), out_dir / overlay_name(image_path)
        mask.save(mask_path)
        Image.fromarray((0.5 * image + 0.5 * colourise(pred)).astype(np.uint8)).save(overlay_path)
        written.append((image_path, mask_path, overlay_path))
    (out_dir / CLASSES_FILE).write_text("\n".join(pipeline.class_names) + "\n")
    return written


def evaluate_split(pipeline: Pipeline, data: DataConfig, split: str | None = None) -> dict[str, Any]:
    """Score the pipeline on a split (default: the validation split) at each image's original size.

    Returns flat metrics named as a trial reports them (``coarse_miou``, ``refined_boundary_iou``,
    ``refined_iou_<class>``, ``refined_miou_t<t>``, ...), ``images``, ``class_names`` and ``split`` (its
    name). Only that split is built (a folder dataset needs no train folder to be scored), with the
    samples ``data.limit_val`` keeps.

    Raises:
        ConfigError: the dataset has no such split.
        DatasetError: its classes are not the ones the model was trained on, or a file of it is bad.
    """
    spec = DATASETS[data.name]
    split = split or data.val_split or spec.val_split
    check_split(data.name, data.root, split)
    dataset = spec.build(data, split, build_transform(data.image_size, train=False), pipeline.cfg.train.seed)
    class_names = list(dataset.class_names)  # type: ignore[attr-defined]
    if class_names != pipeline.class_names:
        where = f" at {data.root}" if data.root else ""
        raise DatasetError(
            f"dataset {data.name}{where} has {len(class_names)} classes {class_names}, but the model of "
            f"{pipeline.source or 'this checkpoint'} predicts {len(pipeline.class_names)} "
            f"{pipeline.class_names}: evaluate needs the classes it was trained on, in the same order "
            "(set data.* to that dataset)"
        )
    if data.limit_val is not None and data.limit_val < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, range(data.limit_val))
    scores = score_at_original_size(pipeline.model, pipeline.transform, dataset, class_names)
    return {**scores, "class_names": class_names, "split": split}


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` whole or not at all: a temporary file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
