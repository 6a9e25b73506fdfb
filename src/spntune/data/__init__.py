"""Datasets by name: ``pets``, ``voc``, ``folder`` and the built-in ``synthetic``.

``build_datasets(data_config, seed)`` returns the train and validation sets with their paired
transforms. Each registry entry knows its default splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset, Subset

from spntune.data.base import IGNORE_INDEX, DatasetError, PairTransform
from spntune.data.folder import load_folder
from spntune.data.pets import load_pets
from spntune.data.synthetic import SyntheticShapes
from spntune.data.transforms import build_transform
from spntune.data.voc import load_voc

if TYPE_CHECKING:
    from spntune.config import DataConfig

__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetError", "DatasetSpec", "build_datasets"]

_SYNTHETIC_VAL_SEED_OFFSET = 1_000_000  # val samples never coincide with train samples


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one registry dataset: ``build(cfg, split, transform, seed) -> Dataset``."""

    build: Callable[[DataConfig, str, PairTransform, int], Dataset]
    train_split: str
    val_split: str


def _pets(cfg: DataConfig, split: str, transform: PairTransform, seed: int) -> Dataset:
    return load_pets(Path(cfg.root or ""), split, cfg.target, transform)


def _voc(cfg: DataConfig, split: str, transform: PairTransform, seed: int) -> Dataset:
    return load_voc(Path(cfg.root or ""), split, transform)


def _folder(cfg: DataConfig, split: str, transform: PairTransform, seed: int) -> Dataset:
    return load_folder(Path(cfg.root or ""), split, transform)


def _synthetic(cfg: DataConfig, split: str, transform: PairTransform, seed: int) -> Dataset:
    if split == "train":
        return SyntheticShapes(cfg.train_size, cfg.image_size, seed, transform)
    return SyntheticShapes(cfg.val_size, cfg.image_size, seed + _SYNTHETIC_VAL_SEED_OFFSET, transform)


#: Datasets by the names used in configs and search spaces.
DATASETS: dict[str, DatasetSpec] = {
    "pets": DatasetSpec(_pets, "trainval", "test"),
    "voc": DatasetSpec(_voc, "train", "val"),
    "folder": DatasetSpec(_folder, "train", "val"),
    "synthetic": DatasetSpec(_synthetic, "train", "val"),
}


def build_datasets(cfg: DataConfig, seed: int = 0) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class_names)``; train gets augmentation, val a plain resize."""
    spec = DATASETS[cfg.name]
    train = spec.build(
        cfg, cfg.train_split or spec.train_split, build_transform(cfg.image_size, True, cfg.augment), seed
    )
    val = spec.build(cfg, cfg.val_split or spec.val_split, build_transform(cfg.image_size, False), seed)
    class_names = list(train.class_names)  # type: ignore[attr-defined]
    if cfg.limit_train is not None and cfg.limit_train < len(train):  # type: ignore[arg-type]
        train = Subset(train, range(cfg.limit_train))
    if cfg.limit_val is not None and cfg.limit_val < len(val):  # type: ignore[arg-type]
        val = Subset(val, range(cfg.limit_val))
    return train, val, class_names
