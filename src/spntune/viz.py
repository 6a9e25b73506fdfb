"""Pictures a person can look at: mask panels and per-iteration strips (PNG).

Panel: image | ground truth | coarse | refined | error map (see ``error_map``).
Strip: the refined argmax after every propagation step h^0 .. h^T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from spntune.data.base import IGNORE_INDEX, denormalise
from spntune.data.voc import voc_palette

__all__ = ["colourise", "error_map", "mask_panel", "step_strip", "write_panels"]

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
_PALETTE[IGNORE_INDEX] = (224, 224, 192)  # VOC's void colour


def colourise(mask: np.ndarray) -> np.ndarray:
    """Class ids ``[H, W]`` -> RGB ``[H, W, 3]`` with the VOC palette (void cream)."""
    return _PALETTE[mask.astype(np.uint8)]


def error_map(coarse: np.ndarray, refined: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB ``[H, W, 3]``: green = fixed by refinement, red = broken by it, white = wrong in
    both, black = right in both, grey = void."""
    valid = target != IGNORE_INDEX
    c_ok, r_ok = (coarse == target) & valid, (refined == target) & valid
    out = np.zeros((*target.shape, 3), dtype=np.uint8)
    out[valid & ~c_ok & ~r_ok] = (255, 255, 255)
    out[valid & ~c_ok & r_ok] = (0, 200, 0)
    out[valid & c_ok & ~r_ok] = (230, 0, 0)
    out[~valid] = (110, 110, 110)
    return out


def _label(tiles: list[np.ndarray], names: list[str]) -> np.ndarray:
    row = np.concatenate(tiles, axis=1)
    header = Image.new("RGB", (row.shape[1], 14), (32, 32, 32))
    draw = ImageDraw.Draw(header)
    width = tiles[0].shape[1]
    for i, name in enumerate(names):
        draw.text((i * width + 3, 1), name, fill=(255, 255, 255))
    return np.concatenate([np.asarray(header), row], axis=0)


def mask_panel(image: np.ndarray, target: np.ndarray, coarse: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """``image | ground truth | coarse | refined | error map`` with a title row."""
    tiles = [image, colourise(target), colourise(coarse), colourise(refined), error_map(coarse, refined, target)]
    return _label(tiles, ["image", "truth", "coarse", "refined", "fixed/broken"])


def step_strip(steps: list[np.ndarray]) -> np.ndarray:
    """``h^0 | h^1 | ... | h^T`` argmax maps with a title row."""
    return _label([colourise(s) for s in steps], [f"t={t}" for t in range(len(steps))])


@torch.no_grad()
def render_examples(
    model: torch.nn.Module, dataset: Dataset, indices: list[int], device: torch.device
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(panel, strip)`` RGB arrays for the given validation samples."""
    was_training = model.training
    model.eval()
    out = []
    for i in indices:
        image, target = dataset[i]
        result = model(image.unsqueeze(0).to(device), return_steps=True)
        coarse = result.coarse_logits.argmax(1)[0].cpu().numpy()
        refined = result.refined_logits.argmax(1)[0].cpu().numpy()
        steps = [s.argmax(1)[0].cpu().numpy() for s in result.steps]
        rgb = denormalise(image)
        out.append((mask_panel(rgb, target.numpy(), coarse, refined), step_strip(steps)))
    model.train(was_training)
    return out


def write_panels(
    model: torch.nn.Module, dataset: Dataset, class_names: list[str], out_dir: Path, count: int, device: torch.device
) -> list[Path]:
    """Write ``panel_<i>.png`` and ``steps_<i>.png`` for the first ``count`` samples."""
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(min(count, len(dataset))))  # type: ignore[arg-type]
    paths = []
    for i, (panel, strip) in zip(indices, render_examples(model, dataset, indices, device), strict=True):
        for name, arr in ((f"panel_{i:03d}.png", panel), (f"steps_{i:03d}.png", strip)):
            Image.fromarray(arr).save(out_dir / name)
            paths.append(out_dir / name)
    legend = "\n".join(f"{i}: {name} rgb{tuple(int(v) for v in _PALETTE[i])}" for i, name in enumerate(class_names))
    (out_dir / "legend.txt").write_text(legend + "\n")
    return paths
