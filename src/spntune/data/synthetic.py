"""Procedural synthetic segmentation data: deterministic by seed, no files needed.

Each image holds a few shapes of four classes -- discs, rotated boxes, triangles and thin
curved strokes -- over a textured background. Shape colours overlap between classes and the
image is blurred, so boundaries are soft and thin structures are hard: the coarse network gets
the blobs and a refiner has edges and strokes to fix.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from spntune.data.base import PairTransform, to_tensors

__all__ = ["SYNTHETIC_CLASSES", "SyntheticShapes", "render_sample"]

SYNTHETIC_CLASSES = ["background", "disc", "box", "triangle", "curve"]

# Base colours (RGB) per class; jittered per shape so colour alone does not decide the class.
_BASE_COLOURS = np.array(
    [[90, 110, 90], [200, 80, 70], [70, 120, 200], [200, 180, 60], [230, 230, 230]], dtype=np.float32
)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def render_sample(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: ``(image [H, W, 3] uint8, mask [H, W] uint8 in 0..4)``; same seed, same sample."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    colour = np.empty((height, width, 3), dtype=np.float32)
    colour[:] = _BASE_COLOURS[0] + rng.uniform(-30, 30, 3)
    colour += 25 * _smooth_noise(rng, height, width, 4)[..., None]  # lighting gradient
    scale = min(height, width)
    for _ in range(int(rng.integers(4, 9))):
        cls = int(rng.integers(1, 5))
        shape = np.zeros((height, width), dtype=np.uint8)
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        if cls == 1:
            axes = (int(rng.uniform(0.08, 0.25) * scale), int(rng.uniform(0.08, 0.25) * scale))
            cv2.ellipse(shape, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif cls == 2:
            size = (float(rng.uniform(0.15, 0.5) * scale), float(rng.uniform(0.1, 0.35) * scale))
            box = cv2.boxPoints(((cx, cy), size, float(rng.uniform(0, 90))))
            cv2.fillPoly(shape, [box.astype(np.int32)], 1)
        elif cls == 3:
            r = rng.uniform(0.12, 0.3) * scale
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
            pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
            cv2.fillPoly(shape, [pts.astype(np.int32)], 1)
        else:
            t = np.linspace(0, 1, 64)
            length = rng.uniform(0.4, 0.9) * scale
            theta = rng.uniform(0, np.pi)
            wiggle = rng.uniform(0.03, 0.12) * scale * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6))
            xs = cx + (t - 0.5) * length * np.cos(theta) - wiggle * np.sin(theta)
            ys = cy + (t - 0.5) * length * np.sin(theta) + wiggle * np.cos(theta)
            thickness = max(1, round(rng.uniform(0.008, 0.025) * scale))
            cv2.polylines(shape, [np.stack([xs, ys], 1).astype(np.int32)], False, 1, thickness)
        inside = shape.astype(bool)
        mask[inside] = cls
        tint = _BASE_COLOURS[cls] + rng.uniform(-45, 45, 3)
        texture = 20 * _smooth_noise(rng, height, width, int(rng.integers(6, 16)))
        colour[inside] = tint + texture[inside, None]
    colour += rng.normal(0, 8, colour.shape).astype(np.float32)  # sensor noise
    colour = cv2.GaussianBlur(colour, (0, 0), sigmaX=0.9)  # soft edges: something to refine
    return colour.clip(0, 255).astype(np.uint8), mask


class SyntheticShapes(Dataset):
    """``length`` procedural samples of ``image_size = (H, W)``; sample i uses seed ``seed + i``.

    Items: ``(image [3, H, W] float32 normalised, mask [H, W] int64)``.
    """

    class_names = SYNTHETIC_CLASSES

    def __init__(
        self,
        length: int,
        image_size: tuple[int, int],
        seed: int = 0,
        transform: PairTransform | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"synthetic dataset length must be >= 1, got {length}")
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(SYNTHETIC_CLASSES)

    def __len__(self) -> int:
        return self.length

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return render_sample(self.seed + index, *self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load_raw(index)
        return to_tensors(image, mask, self.transform)
