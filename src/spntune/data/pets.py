"""Oxford-IIIT Pet in its original layout.

``root/images/<id>.jpg``, ``root/annotations/trimaps/<id>.png`` (1 = pet, 2 = background,
3 = border) and ``root/annotations/{trainval,test}.txt``.
"""

from __future__ import annotations

from pathlib import Path

from spntune.data.base import (
    DatasetError,
    PairedFileDataset,
    PairTransform,
    lookup,
    read_split_file,
    require_dir,
    require_pairs,
)

__all__ = ["PETS_SPLITS", "PETS_TARGETS", "load_pets"]

PETS_SPLITS = ("trainval", "test")

#: Target modes: classes and the trimap value -> class table.
PETS_TARGETS: dict[str, tuple[list[str], dict[int, int]]] = {
    # The common convention (smp's example): the border belongs to the pet.
    "binary": (["background", "pet"], {1: 1, 2: 0, 3: 1}),
    "binary_ignore_border": (["background", "pet"], {1: 1, 2: 0, 3: 255}),
    "trimap": (["pet", "background", "border"], {1: 0, 2: 1, 3: 2}),
}


def load_pets(
    root: Path, split: str, target: str = "binary", transform: PairTransform | None = None
) -> PairedFileDataset:
    """Pets split ``trainval`` or ``test``; ``target`` is a key of ``PETS_TARGETS``."""
    if split not in PETS_SPLITS:
        raise DatasetError(
            f"data.train_split / data.val_split: Oxford-IIIT Pet has the splits {', '.join(PETS_SPLITS)}, got {split!r}"
        )
    if target not in PETS_TARGETS:
        raise DatasetError(f"data.target for Oxford-IIIT Pet takes {', '.join(sorted(PETS_TARGETS))}, got {target!r}")
    root = require_dir(Path(root), "Oxford-IIIT Pet root")
    images = require_dir(root / "images", "Oxford-IIIT Pet images folder")
    trimaps = require_dir(root / "annotations" / "trimaps", "Oxford-IIIT Pet trimaps folder")
    ids = read_split_file(root / "annotations" / f"{split}.txt")
    pairs = [(images / f"{i}.jpg", trimaps / f"{i}.png") for i in ids]
    require_pairs(pairs, root / "annotations" / f"{split}.txt")
    names, mapping = PETS_TARGETS[target]
    return PairedFileDataset(pairs, names, lookup(mapping), transform, "trimap values 1, 2, 3")
