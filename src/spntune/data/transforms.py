"""Paired image/mask transforms (albumentations).

Geometric transforms move image and mask together; photometric ones touch the image only
(albumentations applies them to ``image`` alone). Masks are only ever resampled with
nearest-neighbour (no transform here pads).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from spntune.data.base import PairTransform

__all__ = ["build_transform"]


def build_transform(image_size: tuple[int, int], train: bool, augment: bool = True) -> PairTransform:
    """Transform to ``image_size = (height, width)``; random scale/crop, flip and colour if training.

    Returns:
        ``f(image [h, w, 3] uint8, mask [h, w] uint8) -> (image [H, W, 3], mask [H, W])``.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
    import albumentations as A

    height, width = image_size
    nearest = cv2.INTER_NEAREST
    if train and augment:
        aspect = width / height
        ops = [
            A.RandomResizedCrop(
                size=(height, width),
                scale=(0.35, 1.0),
                ratio=(aspect * 0.8, aspect * 1.25),
                mask_interpolation=nearest,
            ),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02, p=0.8),
        ]
    else:
        ops = [A.Resize(height, width, mask_interpolation=nearest)]
    compose = A.Compose(ops, seed=0)
    randomised = train and augment

    def apply(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if randomised:
            # albumentations keeps its own RNG; drawing its seed from torch's makes augmentation
            # follow torch.manual_seed and DataLoader worker seeding (reproducible, and workers
            # do not repeat each other).
            compose.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        out = compose(image=image, mask=mask)
        return out["image"], out["mask"]

    return apply
