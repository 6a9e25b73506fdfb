"""The file datasets' listings, without torch: what a search checks before Ray starts.

``check_listing`` lists both splits of a ``pets``, ``voc`` or ``folder`` dataset as a trial will (split
files, folders, ``classes.txt``, every image's mask), so a missing file is refused at once, naming it.
Images are decoded only by trials. ``registry.DATASETS`` takes these datasets' default splits from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spntune.data.base import PairTransform
from spntune.data.folder import load_folder
from spntune.data.pets import PETS_SPLITS, load_pets
from spntune.data.voc import find_voc2012, load_voc

if TYPE_CHECKING:
    from spntune.config import DataConfig

__all__ = ["FILE_DATASETS", "FileDataset", "check_listing"]


@dataclass(frozen=True)
class FileDataset:
    """A dataset of image and mask files: ``load(cfg, split, transform)`` lists one split (transform None:
    only listed, as ``check_listing`` does; ``registry`` builds the datasets trials read with it).
    ``splits(root)``: the splits it has and where they were found ("" for a fixed set), None where the
    files under ``root`` cannot tell (its loader refuses that root, naming what it expected)."""

    load: Callable[[DataConfig, str, PairTransform | None], Any]
    train_split: str
    val_split: str
    splits: Callable[[Path], tuple[list[str], str] | None]


def _pets_splits(root: Path) -> tuple[list[str], str]:
    return list(PETS_SPLITS), ""


def _voc_splits(root: Path) -> tuple[list[str], str] | None:
    voc = find_voc2012(root)
    lists = voc / "ImageSets" / "Segmentation" if voc is not None else None
    if lists is None or not lists.is_dir():
        return None
    return sorted(p.stem for p in lists.glob("*.txt")), f"the lists in {lists}"


def _folder_splits(root: Path) -> tuple[list[str], str] | None:
    images = root / "images"
    if not images.is_dir():
        return None
    return sorted(p.name for p in images.iterdir() if p.is_dir()), f"the folders in {images}"


#: The file datasets by their config names (``synthetic`` has no files).
FILE_DATASETS: dict[str, FileDataset] = {
    "pets": FileDataset(
        lambda cfg, split, transform: load_pets(Path(cfg.root or ""), split, cfg.target, transform),
        "trainval",
        "test",
        _pets_splits,
    ),
    "voc": FileDataset(
        lambda cfg, split, transform: load_voc(Path(cfg.root or ""), split, transform), "train", "val", _voc_splits
    ),
    "folder": FileDataset(
        lambda cfg, split, transform: load_folder(Path(cfg.root or ""), split, transform),
        "train",
        "val",
        _folder_splits,
    ),
}


def check_listing(cfg: DataConfig) -> None:
    """List the train and validation splits of a file dataset (nothing for ``synthetic``).

    Raises:
        DatasetError: naming the missing or bad file.
    """
    spec = FILE_DATASETS.get(cfg.name)
    if spec is not None:
        spec.load(cfg, cfg.train_split or spec.train_split, None)
        spec.load(cfg, cfg.val_split or spec.val_split, None)
