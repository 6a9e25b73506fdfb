"""``RefinedSegmenter``: a coarse network followed by a refiner."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from spntune.models.coarse import feature_layer

__all__ = ["RefinedSegmenter", "SegmenterOutput"]


@dataclass
class SegmenterOutput:
    """Logits ``[B, C, H, W]`` of both stages; ``steps`` holds h^0..h^T when requested."""

    coarse_logits: Tensor
    refined_logits: Tensor
    steps: list[Tensor] = field(default_factory=list)


class RefinedSegmenter(nn.Module):
    """``image -> coarse -> refiner``; the refiner sees the image and the coarse logits, and for
    ``affinity_net: shared`` also the coarse network's decoder features (captured on the way through).

    Shape:
        ``[B, 3, H, W] -> SegmenterOutput`` with ``[B, C, H, W]`` logits.
    """

    def __init__(self, coarse: nn.Module, refiner: nn.Module) -> None:
        super().__init__()
        self.coarse = coarse
        self.refiner = refiner
        self._features: list[Tensor] = []
        if getattr(refiner, "wants_features", False):
            feature_layer(coarse).register_forward_pre_hook(self._keep_features)

    def _keep_features(self, _module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._features = [inputs[0]]

    def forward(self, image: Tensor, return_steps: bool = False) -> SegmenterOutput:
        coarse_logits = self.coarse(image)
        features = self._features.pop() if self._features else None
        refined = self.refiner(image, coarse_logits, return_steps=return_steps, features=features)
        return SegmenterOutput(coarse_logits, refined.logits, refined.steps)
