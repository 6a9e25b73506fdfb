"""Refiners: learn per-pixel affinities from image + coarse prediction, then propagate.

The modules only *learn* affinities; the propagation maths lives in ``propagation.py``.
Every head is zero-initialised, so an untrained refiner returns the coarse prediction
unchanged (its argmax is identical) and can only help from step one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from spntune.models.coarse import build_coarse
from spntune.models.memory import contiguous
from spntune.models.propagation import (
    cspn_weights,
    dyspn_attention_channels,
    dyspn_factored_weights,
    dyspn_guidance_weights,
    dyspn_ring_sums,
    num_neighbours,
    num_rings,
    propagate,
    propagate_step,
)

__all__ = [
    "AFFINITY_NETS",
    "REFINERS",
    "AffinityNet",
    "CSPNRefiner",
    "DySPNRefiner",
    "IdentityRefiner",
    "RefinerOutput",
    "SharedAffinityNet",
    "UNetAffinityNet",
]

#: What a propagation refiner propagates: class probabilities (softmax of the coarse logits)
#: or the logits themselves.
PROPAGATED = ("probs", "logits")

_PROB_FLOOR = 1e-6  # keeps log() finite where CSPN's signed weights push a probability to <= 0


@dataclass
class RefinerOutput:
    """Refined logits ``[B, C, H, W]`` and, on request, the logits after every step t = 0..T."""

    logits: Tensor
    steps: list[Tensor] = field(default_factory=list)


class GuidanceHead(nn.Conv2d):
    """The guidance head: a 3x3 convolution, zero-initialised so that the refiner starts as the identity.

    In a channels-last model (``train.channels_last``) a head with more output than input channels runs on
    NCHW memory (its input and weight made contiguous; no-ops in an NCHW model). The propagation reads the
    guidance as NCHW maps, so a channels-last head pays a layout copy of all its output channels forward and
    of their gradient backward; NCHW moves the input's instead, the fewer. With fewer output channels
    (CSPN 3x3: 8 from 32) channels last stays the faster. Same parameters and state-dict keys as
    ``nn.Conv2d``. Measured in ``layout_on_nchw``'s comment."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    @property
    def layout_on_nchw(self) -> bool:
        # U-Net/ResNet-18 training steps, batch 8 at 192x256, channels last, 2-core EPYC VM, old / new code in
        # processes of their own, alternating, best of 6 steps: DySPN 7x7 T=6 (32 -> 72 channels) 1.999 / 1.945
        # and 1.983 / 1.968 s; CSPN 3x3 (32 -> 8) on NCHW memory 1.468 / 1.486 and 1.440 / 1.534 s: slower.
        # The profiler on the DySPN step: the head's forward 103 -> 139 ms, its backward 289 -> 228 ms, the
        # [8, 72, 192, 256] layout copy 71 ms -> none.
        return self.out_channels > self.in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.layout_on_nchw:
            return F.conv2d(x.contiguous(), self.weight.contiguous(), self.bias, padding=1)
        return super().forward(x)


class AffinityNet(nn.Module):
    """``affinity_net: light``: a small full-resolution CNN over ``[image, coarse probabilities]``.

    Two 3x3 conv blocks (the second dilated, for a wider view at no extra cost) and a
    zero-initialised 3x3 head. It sees about 11 px of raw pixels and no semantic context.

    Args:
        in_channels: image channels + classes.
        channels: bottleneck width (a search dimension; the original report tried 64 vs 72).
        out_channels: guidance channels the refiner needs.

    Shape:
        ``image [B, 3, H, W]``, ``probs [B, C, H, W]`` -> ``[B, out_channels, H, W]``
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
        self.head = GuidanceHead(channels, out_channels)

    def forward(self, image: Tensor, probs: Tensor, features: Tensor | None = None) -> Tensor:
        return self.head(self.body(torch.cat([image, probs], dim=1)))


class UNetAffinityNet(nn.Module):
    """``affinity_net: unet``: a segmentation_models.pytorch U-Net over ``[image, coarse probabilities]``
    (the original report's design) whose last decoder width is ``channels`` (the report's bottleneck),
    then the zero-initialised guidance head (the U-Net's own segmentation head, zeroed).

    Shape:
        ``image [B, 3, H, W]``, ``probs [B, C, H, W]`` -> ``[B, out_channels, H, W]``; H, W divisible by 32.
    """

    def __init__(self, in_channels: int, channels: int, out_channels: int, encoder: str = "resnet18",
                 encoder_weights: str | None = None) -> None:  # fmt: skip
        super().__init__()
        # Through the coarse registry: an offline `encoder_weights: imagenet` gives its clear error.
        self.unet = build_coarse("unet", encoder, encoder_weights, out_channels, in_channels=in_channels,
                                 decoder_channels=(256, 128, 64, 32, channels))  # fmt: skip
        smp_head = self.unet.segmentation_head[0]
        if smp_head.kernel_size != (3, 3) or smp_head.padding != (1, 1):
            raise RuntimeError(f"segmentation_models_pytorch's U-Net head changed: {smp_head}, expected a 3x3 conv "
                               "with padding 1 for the guidance head")  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the modules built after it draw the same numbers as before
            self.head = GuidanceHead(smp_head.in_channels, smp_head.out_channels)
        self.unet.segmentation_head[0] = self.head

    def forward(self, image: Tensor, probs: Tensor, features: Tensor | None = None) -> Tensor:
        return self.unet(torch.cat([image, probs], dim=1))


class SharedAffinityNet(nn.Module):
    """``affinity_net: shared``: guidance from the coarse network's own decoder features (the input of its
    segmentation head, upsampled to full resolution) plus the coarse probabilities -- the CSPN / NLSPN /
    DySPN design, nearly free. In two-stage training the features are frozen with the coarse network.

    Shape:
        ``features [B, F, h, w]``, ``probs [B, C, H, W]`` -> ``[B, out_channels, H, W]``
    """

    def __init__(self, feature_channels: int, num_classes: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(feature_channels + num_classes, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.head = GuidanceHead(channels, out_channels)

    def forward(self, image: Tensor, probs: Tensor, features: Tensor | None = None) -> Tensor:
        if features is None:
            raise ValueError("affinity_net 'shared' needs the coarse network's features (use RefinedSegmenter)")
        features = F.interpolate(features.float(), size=probs.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.body(torch.cat([features, probs], dim=1)))


#: Where a propagation refiner's guidance comes from, by ``refiner.affinity_net``.
AFFINITY_NETS = ("light", "unet", "shared")


class IdentityRefiner(nn.Module):
    """``kind: none`` -- the refined prediction is the coarse prediction."""

    iterations = 0
    wants_features = False

    def __init__(self, num_classes: int, **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(
        self, image: Tensor, coarse_logits: Tensor, return_steps: bool = False, features: Tensor | None = None
    ) -> RefinerOutput:
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
        affinity_net: str = "light",
        affinity_encoder: str = "resnet18",
        encoder_weights: str | None = None,
        feature_channels: int | None = None,
        image_channels: int = 3,
        checkpoint_steps: bool = False,
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
        self.checkpoint_steps = checkpoint_steps
        self.wants_features = affinity_net == "shared"
        inputs = image_channels + num_classes
        if affinity_net == "light":
            self.affinity_net: nn.Module = AffinityNet(inputs, channels, guidance_channels)
        elif affinity_net == "unet":
            self.affinity_net = UNetAffinityNet(inputs, channels, guidance_channels, affinity_encoder, encoder_weights)
        elif affinity_net == "shared":
            if not feature_channels:
                raise ValueError("affinity_net 'shared' needs feature_channels (the coarse network's decoder width)")
            self.affinity_net = SharedAffinityNet(feature_channels, num_classes, channels, guidance_channels)
        else:
            raise ValueError(f"unknown affinity_net {affinity_net!r}; valid: {list(AFFINITY_NETS)}")

    def step_weight(self, guidance: Tensor, t: int) -> tuple[Tensor | None, ...]:
        """Weights of step t (0-based) from the guidance: ``(neighbour, self, anchor)``, or with a fourth,
        ``ring_scale``, factored neighbour weights (``propagation.propagate_step``)."""
        raise NotImplementedError

    def step_weights(self, guidance: Tensor) -> list[tuple[Tensor | None, ...]]:
        return [self.step_weight(guidance, t) for t in range(self.iterations)]

    def _step(self, h: Tensor, h0: Tensor, guidance: Tensor, t: int) -> Tensor:
        neighbour, self_weight, anchor, *ring_scale = self.step_weight(guidance, t)
        return propagate_step(h, h0, neighbour, self_weight, anchor, self.kernel_size, *ring_scale)  # type: ignore[arg-type]

    def _propagate_checkpointed(self, h0: Tensor, guidance: Tensor, return_steps: bool) -> tuple[Tensor, list[Tensor]]:
        """``propagate`` with each step (weights + propagation) recomputed in backward."""
        h, steps = h0, [h0] if return_steps else []
        for t in range(self.iterations):
            h = checkpoint(self._step, h, h0, guidance, t, use_reentrant=False)
            if return_steps:
                steps.append(h)
        return h, steps

    def _to_logits(self, h: Tensor) -> Tensor:
        return h.clamp_min(_PROB_FLOOR).log() if self.propagated == "probs" else h

    def forward(
        self, image: Tensor, coarse_logits: Tensor, return_steps: bool = False, features: Tensor | None = None
    ) -> RefinerOutput:
        """Shape: image ``[B, 3, H, W]``, coarse_logits ``[B, C, H, W]`` (features: the coarse network's
        decoder output, for ``affinity_net: shared``) -> ``[B, C, H, W]``."""
        # Propagation in fp32 even under AMP: T chained steps amplify fp16 rounding.
        with torch.autocast(device_type=coarse_logits.device.type, enabled=False):
            coarse_logits = coarse_logits.float()
            probs = coarse_logits.softmax(dim=1)
            guidance = self.affinity_net(image.float(), probs, features)
            h0 = probs if self.propagated == "probs" else coarse_logits
            if self.checkpoint_steps and torch.is_grad_enabled():
                h, steps = self._propagate_checkpointed(h0, guidance, return_steps)
            else:
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
        guidance: where the affinities come from: ``affinity_net`` (``light``, ``unet``, ``shared``),
            ``affinity_encoder`` (unet), ``encoder_weights`` (unet), ``feature_channels`` (shared).
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
        **guidance: Any,
    ) -> None:
        super().__init__(num_classes, num_neighbours(kernel_size), kernel_size, iterations, channels, propagate,
                         **guidance)  # fmt: skip
        self.centre = centre
        self.affinity_norm = affinity_norm

    def step_weight(self, guidance: Tensor, t: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return cspn_weights(guidance, self.centre, self.affinity_norm)

    def step_weights(self, guidance: Tensor) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        return [self.step_weight(guidance, 0)] * self.iterations  # one affinity map for all steps


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
        guidance: as for ``CSPNRefiner``.
    """

    def __init__(
        self,
        num_classes: int,
        kernel_size: int = 7,
        iterations: int = 6,
        channels: int = 32,
        propagate: str = "probs",
        **guidance: Any,
    ) -> None:
        self.n_rings = num_rings(kernel_size)
        guidance_channels = num_neighbours(kernel_size) + (self.n_rings + 1) * iterations
        super().__init__(num_classes, guidance_channels, kernel_size, iterations, channels, propagate, **guidance)

    def step_weight(self, guidance: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Factored weights ``(affinity, self, anchor, ring_scale)`` of step t alone (the recomputation of
        ``checkpoint_steps``): per step only ``[B, R+1, H, W]`` maps are computed; the ``[B, k*k-1, H, W]``
        neighbour weights are formed by the propagation kernel."""
        attention = guidance[:, dyspn_attention_channels(self.kernel_size, t)].sigmoid()
        return dyspn_factored_weights(guidance[:, : num_neighbours(self.kernel_size)], attention, self.kernel_size)

    def step_weights(self, guidance: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        fused = dyspn_guidance_weights(guidance, self.kernel_size, self.iterations)  # one node on the C++ kernels
        if fused is not None:
            return fused  # type: ignore[return-value]
        # One split, not a slice per step: autograd then joins the parts' gradients once instead of
        # zero-filling a guidance-sized gradient per slice.
        affinity, *attention = guidance.split(
            [num_neighbours(self.kernel_size)] + [self.n_rings + 1] * self.iterations, dim=1
        )
        affinity = contiguous(affinity)  # read by every step: one copy here (pooled memory), none per step
        ring_sums = dyspn_ring_sums(affinity, self.kernel_size)  # shared by every step: computed once
        return [dyspn_factored_weights(affinity, a.sigmoid(), self.kernel_size, ring_sums) for a in attention]


#: Refiners by the names used in configs and search spaces.
REFINERS: dict[str, type[nn.Module]] = {
    "none": IdentityRefiner,
    "cspn": CSPNRefiner,
    "dyspn": DySPNRefiner,
}
