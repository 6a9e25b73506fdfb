"""Datasets by name: ``pets``, ``voc``, ``folder`` and the built-in ``synthetic``.

``build_datasets(data_config, seed)`` returns the train and validation sets with their paired
transforms (``registry``). Importing this package imports no torch: the registry's names load on first
use, so listing a file dataset (``listing.check_listing``) refuses a missing file at once.
"""

from __future__ import annotations

from typing import Any

from spntune.data.base import IGNORE_INDEX, DatasetError

__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetError", "DatasetSpec", "build_datasets"]

_REGISTRY = ("DATASETS", "DatasetSpec", "build_datasets")


def __getattr__(name: str) -> Any:
    if name in _REGISTRY:
        from spntune.data import registry  # torch, smp's transforms, the image cache

        return getattr(registry, name)
    raise AttributeError(f"module 'spntune.data' has no attribute {name!r}")
