import numpy as np
import pytest
import torch

from spntune.data.synthetic import SyntheticShapes
from spntune.models import REFINERS, RefinedSegmenter, build_coarse
from spntune.viz import error_map, grad_cam, trial_pictures


def test_error_map_colours():
    target = np.array([[0, 1, 255, 1]])
    coarse = np.array([[0, 0, 0, 0]])
    refined = np.array([[0, 1, 0, 0]])
    out = error_map(coarse, refined, target)
    assert out[0, 0].tolist() == [0, 0, 0]  # right in both
    assert out[0, 1].tolist() == [0, 200, 0]  # fixed by refinement
    assert out[0, 2].tolist() == [110, 110, 110]  # void
    assert out[0, 3].tolist() == [255, 255, 255]  # wrong in both


@pytest.mark.parametrize("arch", ["unet", "fcn", "deeplabv3plus"])
def test_grad_cam_maps_are_normalised_and_image_sized(arch):
    torch.manual_seed(0)
    coarse = build_coarse(arch, "resnet18", None, 3)
    for p in coarse.parameters():
        p.requires_grad_(False)  # works on a frozen network (two-stage training)
    cams = grad_cam(coarse, torch.randn(1, 3, 64, 96), [0, 1])
    assert set(cams) == {0, 1}
    for cam in cams.values():
        assert cam.shape == (64, 96) and cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_trial_pictures_lists_panels_strips_and_gradcam():
    torch.manual_seed(0)
    model = RefinedSegmenter(
        build_coarse("unet", "resnet18", None, 5), REFINERS["cspn"](num_classes=5, channels=8, iterations=3)
    )
    pics = trial_pictures(model, SyntheticShapes(2, (64, 64)), SyntheticShapes.class_names, 2, torch.device("cpu"))
    assert sorted(pics) == ["gradcam/gradcam_000.png", "gradcam/gradcam_001.png", "panels/legend.txt", "panels/panel_000.png",
                            "panels/panel_001.png", "panels/steps_000.png", "panels/steps_001.png"]  # fmt: skip
    assert pics["panels/panel_000.png"].shape == (64 + 14, 5 * 64, 3)
    assert pics["panels/steps_000.png"].shape == (64 + 14, 4 * 64, 3)  # h^0..h^3
