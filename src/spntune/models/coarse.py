"""Coarse segmentation networks: every segmentation_models.pytorch architecture plus FCN.

``build_coarse("unet", encoder="resnet18", encoder_weights=None, num_classes=21)``.
smp has no FCN, so ``fcn`` is an FCN-8s/16s/32s head (Long et al. 2015) over any smp encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

from spntune.errors import WeightsUnavailableError
from spntune.names import check_encoder

__all__ = ["COARSE", "FCN", "WeightsUnavailableError", "build_coarse", "cpu_bf16_native", "feature_channels",
           "feature_layer"]  # fmt: skip


@cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN sees it): where not,
    bf16 autocast emulates it and runs slower than float32 (``train.cpu_bf16`` then stays float32)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class FCN(nn.Module):
    """FCN over an smp encoder: score the stride-32 features, fuse skips, upsample.

    Args:
        encoder_name: any smp encoder name (``resnet34``, ``tu-...``).
        encoder_weights: ``None`` or e.g. ``"imagenet"``.
        classes: number of output classes.
        variant: ``"8s"`` fuses stride 16 and 8 skips, ``"16s"`` stride 16 only, ``"32s"`` none.
        head_channels: width of the conv block before the stride-32 scores (FCN's fc6/fc7).

    Shape:
        ``[B, 3, H, W] -> [B, classes, H, W]`` with H, W divisible by 32.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        classes: int = 1,
        in_channels: int = 3,
        variant: str = "8s",
        head_channels: int = 256,
    ) -> None:
        super().__init__()
        if variant not in ("8s", "16s", "32s"):
            raise ValueError(f"FCN variant must be 8s, 16s or 32s, got {variant!r}")
        self.variant = variant
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=encoder_weights)
        c8, c16, c32 = self.encoder.out_channels[-3:]
        self.head32 = nn.Sequential(
            nn.Conv2d(c32, head_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(head_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(head_channels, classes, 1),
        )
        # Skip scores start at zero, as in the FCN paper: the net begins as FCN-32s.
        self.score16 = nn.Conv2d(c16, classes, 1)
        self.score8 = nn.Conv2d(c8, classes, 1)
        for conv in (self.score16, self.score8):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def feature_layer(self) -> nn.Module:
        """The layer whose input is this FCN's finest fused features (for ``affinity_net: shared``)."""
        return {"8s": self.score8, "16s": self.score16, "32s": self.head32}[self.variant]

    def forward(self, x: Tensor) -> Tensor:
        f8, f16, f32 = self.encoder(x)[-3:]
        score = self.head32(f32)
        if self.variant in ("8s", "16s"):
            score = F.interpolate(score, size=f16.shape[-2:], mode="bilinear", align_corners=False)
            score = score + self.score16(f16)
        if self.variant == "8s":
            score = F.interpolate(score, size=f8.shape[-2:], mode="bilinear", align_corners=False)
            score = score + self.score8(f8)
        return F.interpolate(score, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _smp_factory(arch: str) -> Callable[..., nn.Module]:
    def build(encoder_name: str, encoder_weights: str | None, classes: int, **kwargs: object) -> nn.Module:
        return smp.create_model(
            arch, encoder_name=encoder_name, encoder_weights=encoder_weights, classes=classes, **kwargs
        )

    return build


#: Coarse architectures by config name: every smp architecture plus ``fcn``.
COARSE: dict[str, Callable[..., nn.Module]] = {
    **{name: _smp_factory(name) for name in smp.MODEL_ARCHITECTURES_MAPPING},
    "fcn": FCN,
}


def feature_layer(coarse: nn.Module) -> nn.Module:
    """The module whose *input* is the coarse network's last decoder features: smp's segmentation head,
    or our FCN's finest scoring layer."""
    layer = getattr(coarse, "segmentation_head", None) or getattr(coarse, "feature_layer", None)
    if layer is None:
        raise ValueError(f"no decoder-feature layer known for {type(coarse).__name__}")
    return layer


def feature_channels(coarse: nn.Module) -> int:
    """Channels of ``feature_layer``'s input (its first convolution's input width)."""
    conv = next((m for m in feature_layer(coarse).modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"no convolution in the feature layer of {type(coarse).__name__}")
    return conv.in_channels


def build_coarse(
    arch: str,
    encoder: str,
    encoder_weights: str | None,
    num_classes: int,
    **kwargs: object,
) -> nn.Module:
    """Build a coarse network by registry name, with a clear error for offline weights.

    Raises:
        KeyError: unknown ``arch`` or ``encoder`` (lists the valid names).
        WeightsUnavailableError: ``encoder_weights`` set but the download failed.
    """
    if arch not in COARSE:
        raise KeyError(f"unknown coarse architecture {arch!r}; valid: {sorted(COARSE)}")
    try:
        check_encoder(encoder)  # the names configs are checked against (names.py), renamed timm- ones too
    except ValueError as exc:
        raise KeyError(str(exc)) from None
    try:
        return COARSE[arch](encoder_name=encoder, encoder_weights=encoder_weights, classes=num_classes, **kwargs)
    except (KeyError, ValueError, TypeError):
        raise
    except Exception as exc:  # network / hub errors come in many types
        if encoder_weights is None:
            raise
        raise WeightsUnavailableError(
            f"could not load encoder_weights={encoder_weights!r} for encoder {encoder!r}: "
            f"{type(exc).__name__}: {exc}. smp downloads weights from the Hugging Face hub. "
            "On a machine without internet either set `model.encoder_weights: null` (train from "
            "scratch) or pre-populate the cache: on a connected machine run "
            f"`python -c \"import segmentation_models_pytorch as smp; smp.create_model('unet', "
            f"'{encoder}', encoder_weights='{encoder_weights}')\"`, copy ~/.cache/huggingface to "
            "this machine (or point HF_HOME at it) and set HF_HUB_OFFLINE=1."
        ) from exc
