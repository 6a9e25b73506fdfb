"""Decoded-image cache: each image of a file dataset is decoded and resized once per (files, size).

JPEG/PNG decoding and the first resize dominate a small network's loader time, and every epoch of every
trial repeats them. ``ImageCache.arrays`` decodes a dataset once into two uint8 ``.npy`` files,
``[N, h, w, 3]`` images and ``[N, h, w]`` class-id masks (the value map applied and checked), which
every later epoch, trial and DataLoader worker reads memory-mapped: the operating system's page cache
holds one copy however many processes read it.

What is stored, per split role:

- ``val``: the validation transform's output itself (a plain resize to ``data.image_size``; image
  bilinear, mask nearest), so a cached validation set gives exactly the uncached batches.
- ``train``: a fixed ``TRAIN_SCALE`` x ``data.image_size`` copy (image ``INTER_AREA``, mask nearest);
  the random crop, flip and colour jitter still run on it at every epoch. Crops then come from a
  2x-resolution copy instead of the original file: lossless when the originals are at most twice the
  training size (CamVid at 96x128), a slightly smoothed source otherwise.

Scores at original size (``scoring.py``) and pictures read the original files (``load_raw``), never
the cache.

Entries are keyed by ``sha256`` of the cache format, the files (``data_fingerprint``: paths, sizes,
modification times), the value map, the role and the stored size, so an edited file or another size is
a new entry. Building takes an ``flock`` on ``<key>.lock`` (others wait, then read); files are written
under temporary names and renamed into place, so a reader never sees a half-written entry, and one that
cannot be read or has the wrong shape is rebuilt. Torch-free apart from the Dataset base class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from spntune.data.base import PairedFileDataset, PairTransform, to_tensors
from spntune.filelock import held

__all__ = ["CACHE_FORMAT", "TRAIN_SCALE", "CachedDataset", "ImageCache", "data_fingerprint"]

log = logging.getLogger("spntune.data.cache")

#: Bumped when what an entry holds changes: old entries are then simply not found.
CACHE_FORMAT = 1
#: The training copy is this many times ``data.image_size`` (random crops need more than the final size).
TRAIN_SCALE = 2


def data_fingerprint(*datasets: Dataset) -> str:
    """A hash of the files behind datasets (after ``limit_*``): each file's path relative to their
    common folder, its size and modification time (seconds). Datasets without files (synthetic) hash
    to their type and length; their content follows from the config."""
    listing: list[Any] = []
    files: list[Path] = []
    for ds in datasets:
        base, indices = (ds.dataset, list(ds.indices)) if isinstance(ds, Subset) else (ds, None)
        pairs = getattr(base, "pairs", None)
        if pairs is None:
            listing.append([type(base).__name__, len(indices if indices is not None else base)])  # type: ignore[arg-type]
            continue
        chosen = [pairs[i] for i in indices] if indices is not None else list(pairs)
        # A cached dataset is the same data as the file dataset it wraps.
        kind = "PairedFileDataset" if isinstance(base, CachedDataset) else type(base).__name__
        listing.append([kind, len(chosen), list(getattr(base, "class_names", []))])
        files += [Path(p) for pair in chosen for p in pair]
    if files:
        common = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
        for path in files:
            st = path.stat()
            listing.append([str(path.resolve().relative_to(common)), st.st_size, int(st.st_mtime)])
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _resize(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], role: str) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    if role == "val":  # what build_transform(size, train=False) does (albumentations' Resize defaults)
        interpolation = cv2.INTER_LINEAR
    else:
        shrinking = image.shape[0] * image.shape[1] >= height * width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    image = cv2.resize(image, (width, height), interpolation=interpolation)
    mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask


class ImageCache:
    """A folder of decoded datasets (``<key>.images.npy``, ``<key>.masks.npy``, ``<key>.json``).

    Args:
        root: the folder (created on first use). On a cluster: one folder every node sees at the same
            path, on a file system whose ``flock`` works across nodes (as for the coarse cache).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, dataset: PairedFileDataset, size: tuple[int, int], role: str) -> str:
        fields = [CACHE_FORMAT, data_fingerprint(dataset), hashlib.sha256(dataset.value_map.tobytes()).hexdigest(),
                  role, list(size)]  # fmt: skip
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def arrays(self, dataset: PairedFileDataset, size: tuple[int, int], role: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images [N, h, w, 3], masks [N, h, w])`` uint8, memory-mapped read-only; built on a miss.

        Raises:
            DatasetError: a file cannot be read or a mask holds values outside the classes (as the
                uncached dataset would, naming the file), raised while building.
        """
        key = self.key(dataset, size, role)
        shape = (len(dataset), *size)
        with held(self.root / f"{key}.lock", log, f"image cache: another trial is decoding {key[:12]}"):
            found = self._load(key, shape)
            if found is not None:
                return found
            t0 = time.perf_counter()
            self._build(key, dataset, size, role)
            log.info(
                "image cache: decoded %d images into %s in %.1f s", len(dataset), self.root, time.perf_counter() - t0
            )
            found = self._load(key, shape)
            assert found is not None, "an entry just written cannot be read back"
            return found

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.images.npy", self.root / f"{key}.masks.npy"

    def _load(self, key: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        images_path, masks_path = self._paths(key)
        if not (images_path.is_file() and masks_path.is_file()):
            return None
        try:
            images = np.load(images_path, mmap_mode="r")
            masks = np.load(masks_path, mmap_mode="r")
            if (
                images.shape != (*shape, 3)
                or masks.shape != shape
                or images.dtype != np.uint8
                or masks.dtype != np.uint8
            ):
                raise ValueError(f"shapes {images.shape} / {masks.shape}, expected {(*shape, 3)} / {shape}")
        except Exception as exc:  # truncated, foreign or stale: rebuilt, never a failed trial
            log.warning("image cache: entry %s is unreadable (%s); decoding the images again", images_path, exc)
            images_path.unlink(missing_ok=True)
            masks_path.unlink(missing_ok=True)
            return None
        return images, masks

    def _build(self, key: str, dataset: PairedFileDataset, size: tuple[int, int], role: str) -> None:
        images_path, masks_path = self._paths(key)
        n, (height, width) = len(dataset), size
        tmp_images = tempfile.mkstemp(prefix=f".{key}.", suffix=".images.tmp", dir=self.root)
        tmp_masks = tempfile.mkstemp(prefix=f".{key}.", suffix=".masks.tmp", dir=self.root)
        try:
            for fd, _ in (tmp_images, tmp_masks):
                os.close(fd)
            images = np.lib.format.open_memmap(tmp_images[1], mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
            masks = np.lib.format.open_memmap(tmp_masks[1], mode="w+", dtype=np.uint8, shape=(n, height, width))
            for i in range(n):
                images[i], masks[i] = _resize(*dataset.load_raw(i), size, role)
            images.flush()
            masks.flush()
            del images, masks
            os.replace(tmp_masks[1], masks_path)  # masks first: the images file marks a whole entry
            os.replace(tmp_images[1], images_path)
        except BaseException:
            for _, path in (tmp_images, tmp_masks):
                Path(path).unlink(missing_ok=True)
            raise
        fields = {"format": CACHE_FORMAT, "role": role, "size": list(size), "images": n,
                  "first_file": str(dataset.pairs[0][0])}  # fmt: skip
        (self.root / f"{key}.json").write_text(json.dumps(fields, indent=1))


class CachedDataset(Dataset):
    """A file dataset read from the image cache: items as ``PairedFileDataset``'s, decoded once.

    ``pairs``, ``class_names``, ``num_classes`` and ``load_raw`` (the original files, at their size) are
    the wrapped dataset's, so fingerprints, original-size scoring and pictures see the same data.
    """

    def __init__(self, base: PairedFileDataset, images: np.ndarray, masks: np.ndarray,
                 transform: PairTransform | None) -> None:  # fmt: skip
        self.base, self.images, self.masks, self.transform = base, images, masks, transform
        self.pairs, self.class_names = base.pairs, base.class_names

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.base.load_raw(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(np.array(self.images[index]), np.array(self.masks[index]), self.transform)
