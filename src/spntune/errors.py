"""The errors a user can act on. ``spntune`` prints their message (no traceback) and exits 2.

They live here, apart from the modules that raise them, so the CLI can catch them without
importing torch, smp or Ray.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "DatasetError",
    "NonFiniteLossError",
    "SpntuneError",
    "TrialOutOfMemoryError",
    "WeightsUnavailableError",
]


class SpntuneError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(SpntuneError, ValueError):
    """Invalid trial configuration, search space or option; the message names each bad key or value."""


class DatasetError(SpntuneError, ValueError):
    """A dataset file is missing or malformed; the message names the file."""


class WeightsUnavailableError(SpntuneError, RuntimeError):
    """Pretrained encoder weights cannot be downloaded (offline) and are not cached."""


class NonFiniteLossError(SpntuneError, FloatingPointError):
    """The training loss became NaN or inf; the trial cannot continue."""


class CheckpointError(SpntuneError, ValueError):
    """A file that is not a spntune checkpoint, is truncated, or does not match its own config."""


class TrialOutOfMemoryError(SpntuneError, MemoryError):
    """A trial ran out of (GPU or host) memory; the message names the settings that size it."""


class ClusterError(SpntuneError, RuntimeError):
    """Ray could not be started here, or the cluster at ``--address`` could not be joined."""
