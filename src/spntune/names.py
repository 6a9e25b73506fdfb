"""The names the registries are keyed by, known without importing torch, smp or Ray.

Configs and search spaces are checked against these before anything heavy is imported, so a typo is
refused at once. Each registry holds the implementations under exactly these names
(``models.coarse.COARSE``, ``data.DATASETS``, ``losses.LOSSES``; the refiners' names are
``config.REFINER_CONFIGS``); ``tests/test_models.py`` checks that they agree.
"""

from __future__ import annotations

import math

__all__ = ["ARCHITECTURES", "DATASET_NAMES", "LOSS_NAMES", "parse_loss_spec"]

#: Coarse networks: every segmentation_models.pytorch architecture, plus our FCN.
ARCHITECTURES = (
    "deeplabv3", "deeplabv3plus", "dpt", "fcn", "fpn", "linknet", "manet", "pan", "pspnet", "segformer", "unet",
    "unetplusplus", "upernet",
)  # fmt: skip

DATASET_NAMES = ("folder", "pets", "synthetic", "voc")

LOSS_NAMES = ("ce", "dice", "focal", "jaccard", "lovasz")


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """``"ce+0.5*dice"`` -> ``[(1.0, "ce"), (0.5, "dice")]``; unknown names list the valid ones."""
    terms = []
    for raw in spec.replace(" ", "").split("+"):
        weight_text, _, name = raw.rpartition("*")
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; valid: {list(LOSS_NAMES)} joined by '+'")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight_text!r} in loss spec {spec!r}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"loss weights must be finite numbers > 0, got {weight_text} in {spec!r}")
        terms.append((weight, name))
    return terms
