"""Pascal VOC 2012 segmentation in its original layout.

``VOC2012/JPEGImages/<id>.jpg``, palette PNGs in ``VOC2012/SegmentationClass/<id>.png``
(values 0..20, 255 = void) and ``VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt``.
``root`` may point at ``VOCdevkit/`` or at ``VOC2012/``.
"""

from __future__ import annotations

from pathlib import Path

from spntune.data.base import (
    IGNORE_INDEX,
    DatasetError,
    PairedFileDataset,
    PairTransform,
    lookup,
    read_split_file,
    require_dir,
    require_pairs,
)

__all__ = ["VOC_CLASSES", "find_voc2012", "load_voc", "voc_palette"]

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def voc_palette() -> list[int]:
    """The standard VOC colour map as a flat 768-entry PIL palette (index 255 = cream void)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def find_voc2012(root: Path) -> Path | None:
    """The ``VOC2012`` folder of ``root`` (``VOCdevkit/`` or ``VOC2012/`` itself), or None."""
    return next((c for c in (root / "VOC2012", root) if (c / "JPEGImages").is_dir()), None)


def _voc2012_dir(root: Path) -> Path:
    root = require_dir(Path(root), "VOC root")
    voc = find_voc2012(root)
    if voc is not None:
        return voc
    raise DatasetError(
        f"no VOC 2012 data under {root}: expected {root}/VOC2012/JPEGImages (root = VOCdevkit) "
        f"or {root}/JPEGImages (root = VOC2012)"
    )


def load_voc(root: Path, split: str, transform: PairTransform | None = None) -> PairedFileDataset:
    """VOC 2012 split (``train``, ``val``, ``trainval`` or any list in ImageSets/Segmentation)."""
    voc = _voc2012_dir(root)
    split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = read_split_file(split_file)
    masks = require_dir(voc / "SegmentationClass", "VOC SegmentationClass folder")
    pairs = [(voc / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids]
    require_pairs(pairs, split_file)
    mapping = {i: i for i in range(len(VOC_CLASSES))} | {IGNORE_INDEX: IGNORE_INDEX}
    return PairedFileDataset(pairs, VOC_CLASSES, lookup(mapping), transform, "class indices 0..20 or 255")
