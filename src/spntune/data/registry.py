"""Datasets by name: ``pets``, ``voc``, ``folder`` and the built-in ``synthetic``.

``build_datasets(data_config, seed)`` returns the train and validation sets with their paired
transforms. Each registry entry knows its default splits (the file datasets': ``listing.FILE_DATASETS``).
Imports torch: ``spntune.data`` hands these names out on first use (its ``__getattr__``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset, Subset

from spntune.data.base import IGNORE_INDEX, DatasetError, PairedFileDataset, PairTransform
from spntune.data.cache import CachedDataset, ImageCache, train_cache_size
from spntune.data.listing import FILE_DATASETS, FileDataset
from spntune.data.synthetic import SyntheticShapes
from spntune.data.transforms import build_transform

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


def _file_dataset(spec: FileDataset) -> DatasetSpec:
    """A file dataset of ``listing.FILE_DATASETS`` (its loader and default splits), as the registry builds it."""
    return DatasetSpec(lambda cfg, split, transform, seed: spec.load(cfg, split, transform), spec.train_split,
                       spec.val_split)  # fmt: skip


def _synthetic(cfg: DataConfig, split: str, transform: PairTransform, seed: int) -> Dataset:
    if split == "train":
        return SyntheticShapes(cfg.train_size, cfg.image_size, seed, transform)
    return SyntheticShapes(cfg.val_size, cfg.image_size, seed + _SYNTHETIC_VAL_SEED_OFFSET, transform)


#: Datasets by the names used in configs and search spaces.
DATASETS: dict[str, DatasetSpec] = {
    **{name: _file_dataset(spec) for name, spec in FILE_DATASETS.items()},
    "synthetic": DatasetSpec(_synthetic, "train", "val"),
}


def _first(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples (``data.limit_*``); a file dataset stays one, so only they are cached."""
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    if isinstance(ds, PairedFileDataset):
        return PairedFileDataset(ds.pairs[:n], ds.class_names, ds.value_map, ds.transform, ds.valid_values_hint)
    return Subset(ds, range(n))


def build_datasets(cfg: DataConfig, seed: int = 0, cache: bool = False) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class_names)``; train gets augmentation, val a plain resize.

    With ``cache`` (and ``cfg.cache`` on, ``cfg.cache_dir`` set), file datasets are read from the
    decoded-image cache (``data/cache.py``), built here on a miss for the samples ``limit_*`` keeps.
    """
    spec = DATASETS[cfg.name]
    train_transform = build_transform(cfg.image_size, True, cfg.augment)
    train = spec.build(cfg, cfg.train_split or spec.train_split, train_transform, seed)
    val = spec.build(cfg, cfg.val_split or spec.val_split, build_transform(cfg.image_size, False), seed)
    class_names = list(train.class_names)  # type: ignore[attr-defined]
    train, val = _first(train, cfg.limit_train), _first(val, cfg.limit_val)
    if cache and cfg.cache and cfg.cache_dir:
        images = ImageCache(cfg.cache_dir)
        train_size = train_cache_size(train, cfg.image_size) if isinstance(train, PairedFileDataset) else None
        if train_size is not None and (found := images.arrays(train, train_size, "train")) is not None:
            train = CachedDataset(train, *found, train_transform)
        if isinstance(val, PairedFileDataset) and (found := images.arrays(val, cfg.image_size, "val")) is not None:
            val = CachedDataset(val, *found, None)  # stored as the val transform makes it: nothing left to do
    return train, val, class_names
