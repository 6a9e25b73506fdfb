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
from spntune.metrics import class_ids

__all__ = [
    "PALETTE",
    "cam_overlay",
    "colourise",
    "error_map",
    "grad_cam",
    "mask_panel",
    "save_pictures",
    "step_strip",
    "trial_pictures",
]

PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
PALETTE[IGNORE_INDEX] = (224, 224, 192)  # VOC's void colour


def colourise(mask: np.ndarray) -> np.ndarray:
    """Class ids ``[H, W]`` -> RGB ``[H, W, 3]`` with the VOC palette (void cream)."""
    return PALETTE[mask.astype(np.uint8)]


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
def _render_example(
    model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """``(panel, strip)`` RGB arrays for one normalised ``[3, H, W]`` image and its ``[H, W]`` target."""
    result = model(image.unsqueeze(0).to(device), return_steps=True)
    coarse = class_ids(result.coarse_logits)[0].cpu().numpy()
    refined = class_ids(result.refined_logits)[0].cpu().numpy()
    steps = [class_ids(s)[0].cpu().numpy() for s in result.steps]
    return mask_panel(denormalise(image), target.numpy(), coarse, refined), step_strip(steps)


def save_pictures(pictures: dict[str, np.ndarray | str], root: Path) -> list[Path]:
    """Write ``{relative path: RGB array (PNG) or text}`` under ``root``; returns the paths."""
    paths = []
    for rel, content in pictures.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            Image.fromarray(content).save(path)
        paths.append(path)
    return paths


def _cam_layer(coarse: torch.nn.Module) -> torch.nn.Module:
    """The module whose *input* is the coarse network's last decoder features."""
    for name in ("segmentation_head", "head32"):  # smp models; our FCN (stride-32 features)
        if hasattr(coarse, name):
            return getattr(coarse, name)
    raise ValueError(f"no Grad-CAM layer known for {type(coarse).__name__}")


def grad_cam(
    coarse: torch.nn.Module, image: torch.Tensor, classes: list[int] | None = None, top: int = 4
) -> dict[int, np.ndarray]:
    """Seg-Grad-CAM: for class c, gradients of the summed class-c logits over the pixels predicted
    as c, pooled into channel weights of the last decoder features.

    Args:
        classes: classes to explain; None = the ``top`` largest classes in the prediction.

    Shape:
        image ``[1, 3, H, W]``. Returns ``{class: [H, W] float in 0..1}`` in the order explained.
    """
    captured: dict[str, torch.Tensor] = {}

    def take(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        features = inputs[0].detach().requires_grad_()  # works even when the coarse net is frozen
        captured["features"] = features
        return (features, *inputs[1:])

    handle = _cam_layer(coarse).register_forward_pre_hook(take)
    was_training = coarse.training
    coarse.eval()
    try:
        with torch.enable_grad():
            logits = coarse(image)
            pred = class_ids(logits)
            if classes is None:
                areas = torch.bincount(pred.flatten(), minlength=logits.shape[1])
                classes = [int(c) for c in areas.argsort(descending=True)[:top] if areas[c] > 0]
            features = captured["features"]
            cams = {}
            for c in classes:
                target = (logits[:, c] * (pred == c)).sum()
                (grads,) = torch.autograd.grad(target, features, retain_graph=True)
                weights = grads.mean(dim=(2, 3), keepdim=True)
                cam = torch.relu((weights * features).sum(1, keepdim=True))
                cam = torch.nn.functional.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[
                    0, 0
                ]
                cams[c] = (cam / cam.max().clamp_min(1e-12)).detach().cpu().numpy()
    finally:
        handle.remove()
        coarse.train(was_training)
    return cams


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Jet-coloured CAM blended 50/50 over the RGB image."""
    from matplotlib import colormaps  # only Grad-CAM pictures need matplotlib (slow to import)

    heat = (colormaps["jet"](cam)[..., :3] * 255).astype(np.float32)
    return (0.5 * image.astype(np.float32) + 0.5 * heat).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def trial_pictures(
    model: torch.nn.Module,
    dataset: Dataset,
    class_names: list[str],
    count: int,
    device: torch.device,
    gradcam: bool = True,
) -> dict[str, np.ndarray | str]:
    """Everything a person browses for one trial: ``{relative path: RGB array or text}``.

    ``panels/panel_NNN.png`` (image | truth | coarse | refined | fixed/broken), ``panels/steps_NNN.png``
    (h^0..h^T) and, with ``gradcam``, ``gradcam/gradcam_NNN.png``: one overlay per predicted class
    (the four largest) for the first ``count`` validation images.
    """
    was_training = model.training
    model.eval()
    out: dict[str, np.ndarray | str] = {}
    for i in range(min(count, len(dataset))):  # type: ignore[arg-type]
        image, target = dataset[i]
        out[f"panels/panel_{i:03d}.png"], out[f"panels/steps_{i:03d}.png"] = _render_example(
            model, image, target, device
        )
        if gradcam:
            cams = grad_cam(model.coarse, image.unsqueeze(0).to(device))  # type: ignore[arg-type]
            rgb = denormalise(image)
            out[f"gradcam/gradcam_{i:03d}.png"] = _label(
                [rgb] + [cam_overlay(rgb, cam) for cam in cams.values()], ["image"] + [class_names[c] for c in cams]
            )
    model.train(was_training)
    out["panels/legend.txt"] = (
        "\n".join(f"{i}: {n} rgb{tuple(int(v) for v in PALETTE[i])}" for i, n in enumerate(class_names)) + "\n"
    )
    return out
