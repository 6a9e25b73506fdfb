"""File-backed segmentation datasets: pairing, decoding and checking image/mask files.

Every loader produces ``(image_path, mask_path)`` pairs and a lookup table that maps raw mask
values to class indices (255 = void). Decoding checks each file and raises ``DatasetError``
naming it: unreadable image, size mismatch, mask values that are not classes.

No torch at import: listing a dataset (``listing.check_listing``, before a search starts) needs none;
``PairedFileDataset`` is a map-style dataset by its ``__len__`` / ``__getitem__``, as ``DataLoader`` takes
one, and imports torch when it makes tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from spntune.errors import DatasetError
from spntune.images import open_image, read_rgb

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE_INDEX",
    "DatasetError",
    "PairedFileDataset",
    "read_split_file",
    "read_text_file",
    "require_dir",
    "require_file",
    "require_pairs",
]

IGNORE_INDEX = 255

#: ``(image HxWx3 uint8, mask HxW uint8) -> (image, mask)`` paired transform.
PairTransform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: expected a directory at {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} not found: expected a file at {path}")
    return path


def require_pairs(pairs: Sequence[tuple[Path, Path]], listed_in: Path) -> None:
    """Every listed image and mask exists; otherwise name the first missing file."""
    for image, mask in pairs:
        for path, what in ((image, "image"), (mask, "mask")):
            if not path.is_file():
                raise DatasetError(f"{what} {path} (listed in {listed_in}) does not exist")


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's content; a file that is not text is refused naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_split_file(path: Path) -> list[str]:
    """Ids from a split list: the first whitespace-separated field per line; '#' comments skipped."""
    require_file(path, "split file")
    ids = []
    for line in read_text_file(path, "split file").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line.split()[0])
    if not ids:
        raise DatasetError(f"split file {path} lists no ids")
    return ids


def _open(path: Path, what: str) -> Image.Image:
    return open_image(path, what)


def read_image(path: Path) -> np.ndarray:
    """RGB ``[H, W, 3]`` uint8; greyscale, RGBA, palette and CMYK files are converted, 16-bit greyscale
    is scaled to 8 bits and float greyscale in 0..1 to 0..255 (``spntune.images``, which refuses a
    float image outside 0..1).

    Raises:
        DatasetError: naming the file: missing, corrupt, too large to decode, or of a value range
            that cannot be scaled.
    """
    return read_rgb(path)


def read_mask(path: Path) -> np.ndarray:
    """Raw mask values ``[H, W]`` uint8: palette indices for palette PNGs, grey levels otherwise."""
    img = _open(path, "mask")
    if img.mode not in ("L", "P", "I", "I;16"):
        raise DatasetError(
            f"mask {path} has mode {img.mode!r}: expected a single-channel PNG (greyscale "
            "or palette) holding a class index per pixel, not a colour image"
        )
    mask = np.asarray(img)
    if mask.max(initial=0) > 255:
        raise DatasetError(f"mask {path} has values above 255 (max {mask.max()})")
    return mask.astype(np.uint8)


class PairedFileDataset:
    """Image/mask file pairs with value mapping, validation and a paired transform.

    Args:
        pairs: ``(image_path, mask_path)`` per sample.
        class_names: names of the classes, index = class id.
        value_map: 256-entry lookup, raw mask value -> class index or 255; entries for values
            that must never occur are -1 and raise ``DatasetError``.
        transform: paired transform applied to ``(image, mask)`` numpy arrays.
        valid_values_hint: human description of the allowed raw values, for error messages.

    Items: ``(image [3, H, W] float32 normalised, mask [H, W] int64)``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        value_map: np.ndarray,
        transform: PairTransform | None = None,
        valid_values_hint: str = "",
    ) -> None:
        if not pairs:
            raise DatasetError("dataset has no samples")
        self.pairs = list(pairs)
        self.class_names = list(class_names)
        self.value_map = value_map
        self.transform = transform
        self.valid_values_hint = valid_values_hint

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, checked ``(image [H, W, 3] uint8, mask [H, W] uint8 class ids)``."""
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_mask(mask_path)
        if raw.shape != image.shape[:2]:
            raise DatasetError(
                f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but "
                f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} (width x height)"
            )
        mapped = self.value_map[raw]
        if (mapped < 0).any():
            bad = sorted(int(v) for v in np.unique(raw[mapped < 0]))
            raise DatasetError(
                f"mask {mask_path} has values {bad[:10]} outside the dataset's classes; "
                f"expected {self.valid_values_hint}"
            )
        return image, mapped.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load_raw(index)
        return to_tensors(image, mask, self.transform)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_tensors(
    image: np.ndarray, mask: np.ndarray, transform: PairTransform | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the paired transform, normalise with ImageNet statistics, convert to tensors."""
    import torch  # the dataset's items only: listing a dataset imports none

    if transform is not None:
        image, mask = transform(image, mask)
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.from_numpy(
        np.ascontiguousarray(mask).astype(np.int64)
    )


def denormalise(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` normalised tensor -> ``[H, W, 3]`` uint8 for pictures."""
    x = image.detach().cpu().float().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (x.clip(0, 1) * 255).round().astype(np.uint8)


def lookup(mapping: dict[int, int]) -> np.ndarray:
    """256-entry value map from ``{raw value: class}``; unlisted values map to -1 (invalid)."""
    table = np.full(256, -1, dtype=np.int16)
    for raw, cls in mapping.items():
        table[raw] = cls
    return table
