"""Decoded-image cache: each image of a file dataset is decoded and resized once per (files, size).

JPEG/PNG decoding and the first resize dominate a small network's loader time, and every epoch of every
trial repeats them. ``ImageCache.arrays`` decodes a dataset once into two uint8 ``.npy`` files,
``[N, h, w, 3]`` images and ``[N, h, w]`` class-id masks (the value map applied and checked), which
every later epoch, trial and DataLoader worker reads memory-mapped: the operating system's page cache
holds one copy however many processes read it.

What is stored, per split role:

- ``val``: the validation transform's output itself (a plain resize to ``data.image_size``; image
  bilinear, mask nearest), so a cached validation set gives exactly the uncached batches.
- ``train``: only for a split whose images all have one size with the training size's aspect ratio
  (within 2%; CamVid, Cityscapes-like data): a copy at ``TRAIN_SCALE`` x ``data.image_size`` or the
  original size, whichever is smaller (image ``INTER_AREA``, mask nearest); the random crop, flip and
  colour jitter still run on it at every epoch. Lossless when the originals are at most twice the
  training size (CamVid at 96x128), a smoothed source otherwise. Images of many shapes (Pets, VOC)
  would have to be squashed to one shape, which changes what random crops see: their training split
  is read from the files (``train_size`` says so), only their validation split is cached.

Scores at original size (``scoring.py``) and pictures read the original files (``load_raw``), never
the cache.

Entries are keyed by ``sha256`` of the cache format, the files (``data_fingerprint``: paths, sizes,
modification times), the value map, the role and the stored size, so an edited file or another size is
a new entry; the Pillow and OpenCV versions are in the key too (they decode and resize). Building takes
an ``flock`` on ``<key>.lock`` (others wait, then read); files are written with plain writes (a full disk
is an ``OSError``, not a crash) under temporary names and renamed into place, so a reader never sees a
half-written entry, and one that cannot be read or has the wrong shape is rebuilt. A cache folder that
cannot be written (permissions, a full disk) costs speed, never the trial: the data is then read from the
files, with a warning. Entries are never deleted by spntune: remove the folder to clear it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from spntune.data.base import PairedFileDataset, PairTransform, to_tensors
from spntune.filelock import held

__all__ = ["CACHE_FORMAT", "TRAIN_SCALE", "CachedDataset", "ImageCache", "data_fingerprint", "train_cache_size"]

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
        # A cached dataset holds the files of the dataset it wraps (how they are read is in the coarse key).
        kind = "PairedFileDataset" if isinstance(base, CachedDataset) else type(base).__name__
        listing.append([kind, len(chosen), list(getattr(base, "class_names", []))])
        files += [Path(p) for pair in chosen for p in pair]
    if files:
        common = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
        for path in files:
            st = path.stat()
            listing.append([str(path.resolve().relative_to(common)), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _resize(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], role: str) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    if image.shape[:2] == (height, width):
        return image, mask
    if role == "val":  # what build_transform(size, train=False) does (albumentations' Resize defaults)
        interpolation = cv2.INTER_LINEAR
    else:
        shrinking = image.shape[0] * image.shape[1] >= height * width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    image = cv2.resize(image, (width, height), interpolation=interpolation)
    mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask


def train_cache_size(dataset: PairedFileDataset, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """The size a training split is cached at, or None when its images differ in size or their aspect
    ratio is not the training size's (within 2%): caching those would squash them (module docstring).
    Reads only the files' headers."""
    sizes = set()
    for image_path, _ in dataset.pairs:
        try:
            with Image.open(image_path) as img:
                sizes.add(img.size)  # (width, height)
        except (OSError, SyntaxError, Image.DecompressionBombError):  # unreadable: the build names the file
            return None
        if len(sizes) > 1:
            return None
    (width, height), (target_h, target_w) = sizes.pop(), image_size
    if abs((width / height) / (target_w / target_h) - 1) > 0.02:
        return None
    return min(height, target_h * TRAIN_SCALE), min(width, target_w * TRAIN_SCALE)


def _npy_writer(path: Path, shape: tuple[int, ...]) -> BinaryIO:
    """An open uint8 ``.npy`` file of ``shape`` with its header written: rows follow with plain writes (a
    memory map over a sparse file would die of SIGBUS on a full disk instead of raising)."""
    fh = open(path, "wb")
    np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return fh


def _close_npy(fh: BinaryIO) -> None:
    """Sync and close, and let the file be read as the umask allows (other users of a shared cache)."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(fh.name, 0o666 & ~umask)


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
                  role, list(size), PIL.__version__, cv2.__version__]  # fmt: skip
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def arrays(self, dataset: PairedFileDataset, size: tuple[int, int],
               role: str) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
        """``(images [N, h, w, 3], masks [N, h, w])`` uint8, memory-mapped read-only; built on a miss.
        None (with a warning) when the cache folder cannot be written: the caller reads the files.

        Raises:
            DatasetError: a file cannot be read or a mask holds values outside the classes (as the
                uncached dataset would, naming the file), raised while building.
        """
        key = self.key(dataset, size, role)
        shape = (len(dataset), *size)
        try:
            with held(self.root / f"{key}.lock", log, f"image cache: another trial is decoding {key[:12]}"):
                found = self._load(key, shape)
                if found is None:
                    t0 = time.perf_counter()
                    self._build(key, dataset, size, role)
                    log.info("image cache: decoded %d images into %s in %.1f s", len(dataset), self.root,
                             time.perf_counter() - t0)  # fmt: skip
                    found = self._load(key, shape)
        except OSError as exc:  # not DatasetError: that is about the data, and the trial must hear it
            warnings.warn(f"image cache: cannot write {self.root} ({exc.strerror or exc}); reading the images "
                          "from their files", RuntimeWarning, stacklevel=2)  # fmt: skip
            return None
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
        """Decode ``dataset`` into the key's entry (call with the key's lock held)."""
        for stale in self.root.glob(f".{key}.*.tmp"):  # left by a builder that died: the lock is ours now
            stale.unlink(missing_ok=True)
        images_path, masks_path = self._paths(key)
        n, (height, width) = len(dataset), size
        tmp_images = self.root / f".{key}.{os.getpid()}.images.tmp"
        tmp_masks = self.root / f".{key}.{os.getpid()}.masks.tmp"
        try:
            with (
                _npy_writer(tmp_images, (n, height, width, 3)) as images,
                _npy_writer(tmp_masks, (n, height, width)) as masks,
            ):
                for i in range(n):
                    image, mask = _resize(*dataset.load_raw(i), size, role)
                    images.write(np.ascontiguousarray(image).tobytes())
                    masks.write(np.ascontiguousarray(mask).tobytes())
                _close_npy(images)
                _close_npy(masks)
            os.replace(tmp_masks, masks_path)  # masks first: the images file marks a whole entry
            os.replace(tmp_images, images_path)
        finally:
            tmp_images.unlink(missing_ok=True)
            tmp_masks.unlink(missing_ok=True)
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
