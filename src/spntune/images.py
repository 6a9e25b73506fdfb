"""Image files decoded to RGB ``[H, W, 3]`` uint8, without torch: datasets read their images through
``read_rgb`` (``data.base.read_image``), and ``spntune predict`` decodes every input with it before it
loads a model, so a file it cannot use is refused before anything is written.

What a file holds becomes 0..255 per channel:

- 8-bit greyscale, palette, RGBA, CMYK and 16-bit RGB(A) PNGs: converted by PIL (16-bit colour keeps
  its high byte).
- 16-bit greyscale (PNG or TIFF; PIL modes ``I;16*``, and ``I`` holding values up to 65535): divided
  by 257, so 65535 is 255. PIL's own conversion clips such an image to black and white. One whose values
  all lie in 0..255 is 8-bit data in a wider container (a 32-bit TIFF) and keeps its values.
- Floating-point greyscale (TIFF, mode ``F``): values in 0..1 are multiplied by 255. Values outside
  0..1 (or NaN) are refused rather than guessed at: such a file may hold 0..255, 0..65535 or HDR
  radiance, and a wrong guess gives a plausible but wrong mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from spntune.errors import DatasetError

__all__ = ["open_image", "read_rgb", "rgb_array"]

_UINT16_MAX = 65535
_UINT16_TO_UINT8 = 257  # 65535 / 255: maps 0..65535 onto 0..255 exactly


def open_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode ``path``; anything PIL cannot decode raises ``DatasetError`` naming the file.

    Raises:
        DatasetError: missing, a folder, not an image, truncated or corrupt, or larger than PIL's
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; PIL refuses twice that many pixels).
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened
    except FileNotFoundError:
        raise DatasetError(f"{what} file missing: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"{what} {path} is a folder, not an image file") from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(
            f"{what} {path} is too large to decode safely ({exc}); shrink it, or split it into tiles"
        ) from None
    except Exception as exc:  # PIL raises OSError for most corrupt files, other types for a few
        empty = Path(path).is_file() and Path(path).stat().st_size == 0
        reason = "the file is empty (0 bytes)" if empty else str(exc) or type(exc).__name__
        raise DatasetError(f"cannot read {what} {path}: {reason}") from None


def rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """``img`` as RGB ``[H, W, 3]`` uint8, 16-bit and float greyscale scaled (see the module docstring).

    Raises:
        DatasetError: a float image with values outside 0..1, or an integer image outside 0..65535.
    """
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            finite = values[np.isfinite(values)]
            found = f"from {finite.min():g} to {finite.max():g}" if finite.size else "no finite values"
            nan = " and NaN or infinite values" if finite.size < values.size else ""
            raise DatasetError(
                f"image {path} holds floating-point values {found}{nan} (PIL mode F): expected values "
                "in 0..1 (0 black, 1 white); scale it to 0..1, or save it as an 8- or 16-bit image"
            )
        grey = np.rint(values * 255).astype(np.uint8)
    elif img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img)
        low, high = int(values.min(initial=0)), int(values.max(initial=0))
        if low < 0 or high > _UINT16_MAX:
            raise DatasetError(
                f"image {path} holds integer values from {low} to {high} (PIL mode {img.mode}): expected "
                f"0..{_UINT16_MAX} (a 16-bit image); save it as an 8- or 16-bit image"
            )
        # values within 0..255 are 8-bit data in a wider container (a 32-bit TIFF): kept, as PIL's own
        # conversion keeps them; a 16-bit image that dark is rarer than that
        grey = (
            values.astype(np.uint8)
            if high <= 255
            else np.rint(values.astype(np.float32) / _UINT16_TO_UINT8).astype(np.uint8)
        )
    else:
        return np.asarray(img.convert("RGB"))
    return np.repeat(grey[..., None], 3, axis=2)


def read_rgb(path: Path, what: str = "image") -> np.ndarray:
    """Decode ``path`` to RGB ``[H, W, 3]`` uint8 (``open_image`` + ``rgb_array``)."""
    return rgb_array(open_image(path, what), path)
