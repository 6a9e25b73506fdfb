"""Coarse networks, refiners and their composition."""

from spntune.models.coarse import COARSE, FCN, WeightsUnavailableError, build_coarse
from spntune.models.refiners import REFINERS, CSPNRefiner, DySPNRefiner, IdentityRefiner
from spntune.models.segmenter import RefinedSegmenter, SegmenterOutput

__all__ = [
    "COARSE",
    "FCN",
    "REFINERS",
    "CSPNRefiner",
    "DySPNRefiner",
    "IdentityRefiner",
    "RefinedSegmenter",
    "SegmenterOutput",
    "WeightsUnavailableError",
    "build_coarse",
]
