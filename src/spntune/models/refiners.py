"""Refiners: learn per-pixel affinities from image + coarse prediction, then propagate.

The modules only *learn* affinities; the propagation maths lives in ``propagation.py``.
Every head is zero-initialised, so an untrained refiner returns the coarse prediction
unchanged (its argmax is identical) and can only help from step one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spntune.models.propagation import (
    cspn_weights,
    dyspn_weights,
    num_neighbours,
    num_rings,
    propagate,
)

__all__ = ["REFINERS", "AffinityNet", "CSPNRefiner", "DySPNRefiner", "IdentityRefiner", "RefinerOutput"]

#: What a propagation refiner propagates: class probabilities (softmax of the coarse logits)
#: or the logits themselves.
PROPAGATED = ("probs", "logits")

_PROB_FLOOR = 1e-6  # keeps log() finite where CSPN's signed weights push a probability to <= 0


@dataclass
class RefinerOutput:
    """Refined logits ``[B, C, H, W]`` and, on request, the logits after every step t = 0..T."""

    logits: Tensor
    steps: list[Tensor] = field(default_factory=list)


class AffinityNet(nn.Module):
    """Small full-resolution CNN: ``[image, coarse probabilities] -> guidance maps``.

    Two 3x3 conv blocks (the second dilated, for a wider view at no extra cost) and a
    zero-initialised 3x3 head.

    Args:
        in_channels: image channels + classes.
        channels: bottleneck width (a search dimension; the original report tried 64 vs 72).
        out_channels: guidance channels the refiner needs.

    Shape:
        ``[B, in_channels, H, W] -> [B, out_channels, H, W]``
    """

    def __init__(self, in_channels: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class IdentityRefiner(nn.Module):
    """``kind: none`` -- the refined prediction is the coarse prediction."""

    iterations = 0

    def __init__(self, num_classes: int, **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, image: Tensor, coarse_logits: Tensor, return_steps: bool = False) -> RefinerOutput:
        return RefinerOutput(coarse_logits, [coarse_logits] if return_steps else [])


class _PropagationRefiner(nn.Module):
    """Shared scaffolding: guidance from ``AffinityNet``, then ``iterations`` steps."""

    def __init__(
        self,
        num_classes: int,
        guidance_channels: int,
        kernel_size: int,
        iterations: int,
        channels: int,
        propagate: str,
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        if propagate not in PROPAGATED:
            raise ValueError(f"propagate must be one of {PROPAGATED}, got {propagate!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.num_classes = num_classes
        self.kernel_size = kernel_size
        self.iterations = iterations
        self.propagated = propagate
        self.affinity_net = AffinityNet(image_channels + num_classes, channels, guidance_channels)

    def step_weights(self, guidance: Tensor) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        raise NotImplementedError

    def _to_logits(self, h: Tensor) -> Tensor:
        return h.clamp_min(_PROB_FLOOR).log() if self.propagated == "probs" else h

    def forward(self, image: Tensor, coarse_logits: Tensor, return_steps: bool = False) -> RefinerOutput:
        """Shape: image ``[B, 3, H, W]``, coarse_logits ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        # Propagation in fp32 even under AMP: T chained steps amplify fp16 rounding.
        with torch.autocast(device_type=coarse_logits.device.type, enabled=False):
            coarse_logits = coarse_logits.float()
            probs = coarse_logits.softmax(dim=1)
            guidance = self.affinity_net(torch.cat([image.float(), probs], dim=1))
            h0 = probs if self.propagated == "probs" else coarse_logits
            h, steps = propagate(h0, self.step_weights(guidance), self.kernel_size, return_steps)
            return RefinerOutput(self._to_logits(h), [self._to_logits(s) for s in steps])


class CSPNRefiner(_PropagationRefiner):
    """CSPN: one affinity map ``[B, k*k-1, H, W]`` reused for all T iterations.

    Args:
        num_classes: C.
        kernel_size: odd k in 3..11.
        iterations: T.
        channels: affinity-network bottleneck.
        centre: ``"h0"`` (official) or ``"ht"``: where the centre weight goes.
        propagate: ``"probs"`` or ``"logits"``.
        affinity_norm: ``"abs_sum"`` (paper) or ``"clamped"``; see ``propagation.AFFINITY_NORMS``.
    """

    def __init__(
        self,
        num_classes: int,
        kernel_size: int = 3,
        iterations: int = 6,
        channels: int = 32,
        centre: str = "h0",
        propagate: str = "probs",
        affinity_norm: str = "abs_sum",
    ) -> None:
        super().__init__(num_classes, num_neighbours(kernel_size), kernel_size, iterations, channels, propagate)
        self.centre = centre
        self.affinity_norm = affinity_norm

    def step_weights(self, guidance: Tensor) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        weights = cspn_weights(guidance, self.centre, self.affinity_norm)
        return [weights] * self.iterations


class DySPNRefiner(_PropagationRefiner):
    """DySPN: shared neighbour affinities plus (R+1) sigmoid attention maps per iteration.

    Guidance layout (the authors' order, without their confidence/initial channels):
    ``k*k-1`` affinities, then ``(R+1)*T`` attention logits, iteration-major.

    Args:
        num_classes: C.
        kernel_size: odd k; R = (k-1)/2 rings (7 -> 3 rings, 48 + 4T channels as in the paper).
        iterations: T (paper: 6).
        channels: affinity-network bottleneck.
        propagate: ``"probs"`` or ``"logits"``.
    """

    def __init__(
        self,
        num_classes: int,
        kernel_size: int = 7,
        iterations: int = 6,
        channels: int = 32,
        propagate: str = "probs",
    ) -> None:
        self.n_rings = num_rings(kernel_size)
        guidance_channels = num_neighbours(kernel_size) + (self.n_rings + 1) * iterations
        super().__init__(num_classes, guidance_channels, kernel_size, iterations, channels, propagate)

    def step_weights(self, guidance: Tensor) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        n = num_neighbours(self.kernel_size)
        affinity = guidance[:, :n]
        attention = guidance[:, n:].sigmoid().split(self.n_rings + 1, dim=1)
        return [dyspn_weights(affinity, pi, self.kernel_size) for pi in attention]


#: Refiners by the names used in configs and search spaces.
REFINERS: dict[str, type[nn.Module]] = {
    "none": IdentityRefiner,
    "cspn": CSPNRefiner,
    "dyspn": DySPNRefiner,
}
