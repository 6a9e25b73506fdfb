"""``RefinedSegmenter``: a coarse network followed by a refiner."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["RefinedSegmenter", "SegmenterOutput"]


@dataclass
class SegmenterOutput:
    """Logits ``[B, C, H, W]`` of both stages; ``steps`` holds h^0..h^T when requested."""

    coarse_logits: Tensor
    refined_logits: Tensor
    steps: list[Tensor] = field(default_factory=list)


class RefinedSegmenter(nn.Module):
    """``image -> coarse -> refiner``; the refiner sees the image and the coarse logits.

    Shape:
        ``[B, 3, H, W] -> SegmenterOutput`` with ``[B, C, H, W]`` logits.
    """

    def __init__(self, coarse: nn.Module, refiner: nn.Module) -> None:
        super().__init__()
        self.coarse = coarse
        self.refiner = refiner

    def forward(self, image: Tensor, return_steps: bool = False) -> SegmenterOutput:
        coarse_logits = self.coarse(image)
        refined = self.refiner(image, coarse_logits, return_steps=return_steps)
        return SegmenterOutput(coarse_logits, refined.logits, refined.steps)
