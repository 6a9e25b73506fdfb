"""A user's own data: ``images/<split>/<stem>.{jpg,jpeg,png}``, ``masks/<split>/<stem>.png``
(class index per pixel, 255 = void) and ``classes.txt`` (one class name per line)."""

from __future__ import annotations

from pathlib import Path

from spntune.data.base import (
    IGNORE_INDEX,
    DatasetError,
    PairedFileDataset,
    PairTransform,
    lookup,
    read_text_file,
    require_dir,
    require_file,
)

__all__ = ["IMAGE_SUFFIXES", "load_folder", "read_classes"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_classes(root: Path) -> list[str]:
    path = require_file(Path(root) / "classes.txt", "classes.txt (one class name per line)")
    names = [line.strip() for line in read_text_file(path, "classes.txt").splitlines() if line.strip()]
    if not 1 <= len(names) <= 255:
        raise DatasetError(f"{path} must list 1..255 class names, found {len(names)}")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path} lists a class name twice")
    return names


def load_folder(root: Path, split: str, transform: PairTransform | None = None) -> PairedFileDataset:
    """Pairs images and masks of ``split`` by file stem; every image needs a mask and vice versa."""
    root = require_dir(Path(root), "dataset root")
    names = read_classes(root)
    image_dir = require_dir(root / "images" / split, f"images folder for split {split!r}")
    mask_dir = require_dir(root / "masks" / split, f"masks folder for split {split!r}")
    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:  # one mask per stem: which image it labels is not known
                raise DatasetError(f"images {images[p.stem]} and {p} share the name {p.stem!r}, and so one mask; "
                                   "rename or remove one")  # fmt: skip
            images[p.stem] = p
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() == ".png"}
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    missing_masks = sorted(set(images) - set(masks))
    if missing_masks:
        raise DatasetError(
            f"image {images[missing_masks[0]]} has no mask: expected {mask_dir / missing_masks[0]}.png"
            + (f" ({len(missing_masks)} images lack masks)" if len(missing_masks) > 1 else "")
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DatasetError(f"mask {masks[orphans[0]]} has no image in {image_dir}")
    pairs = [(images[s], masks[s]) for s in sorted(images)]
    mapping = {i: i for i in range(len(names))} | {IGNORE_INDEX: IGNORE_INDEX}
    hint = f"class indices 0..{len(names) - 1} (classes.txt) or 255"
    return PairedFileDataset(pairs, names, lookup(mapping), transform, hint)
