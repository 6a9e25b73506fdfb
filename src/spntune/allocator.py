"""glibc malloc settings that let a training process reuse the memory it frees.

A training step allocates and frees the same large tensors every step (activations, gradients, the
propagation's maps). With glibc's defaults each comes back as fresh memory, paged in again by the
kernel on its first write:

- a block above the mmap threshold (dynamic, at most 32 MB) gets its own ``mmap`` and is unmapped on
  free;
- free memory at the top of the heap beyond the trim threshold goes back to the kernel;
- every thread gets an arena of its own, and in such an arena a block over 64 MB is mapped afresh even
  where ``mmap`` is switched off. Ray Tune runs a trial in a thread of its worker process.

On the 2-core EPYC VM, a CamVid training step (U-Net/ResNet-18 + DySPN 7x7, T=6, batch 8 at
192x256, CPU, run in a thread as Ray runs it) took 120-190k minor page faults and 0.23-0.38 s of
system time per step with the defaults, and 2-3k faults and 0.00-0.03 s with the settings below; the
median step took 2.00 instead of 2.21 s. Peak memory grows a little (2.92 -> 3.14 GB over a CamVid
epoch): freed memory stays with the process until it exits.

The settings (``SETTINGS``): one arena for all threads, no ``mmap`` for blocks, no trimming. Where:

- Ray trial workers get them as environment variables when they start (``worker_env``; ``tune.py``
  passes them in the runtime environment of the Ray it starts). They must be there at process start:
  by the time a trial runs, its thread already has an arena of its own.
- ``spntune train``, ``evaluate`` and ``predict`` set them in their own process with ``mallopt``
  (``reuse_freed_memory``) before any thread starts.

``SPNTUNE_MALLOC_REUSE=0`` keeps glibc's defaults (``1``, the default, applies them); a variable the
user's environment already sets (``MALLOC_ARENA_MAX``, ...) is kept as it is. Elsewhere than glibc
(macOS, musl) nothing is changed. Light to import: no torch.
"""

from __future__ import annotations

import ctypes
import os
import sys

from spntune.errors import ConfigError

__all__ = ["ENV_VAR", "SETTINGS", "enabled", "reuse_freed_memory", "worker_env"]

ENV_VAR = "SPNTUNE_MALLOC_REUSE"

_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: the largest threshold it accepts, 2 GiB

#: name -> (environment variable glibc reads at start, mallopt parameter number, value)
SETTINGS: dict[str, tuple[str, int, int]] = {
    "arena_max": ("MALLOC_ARENA_MAX", -8, 1),  # M_ARENA_MAX: every thread allocates in the main arena
    "mmap_max": ("MALLOC_MMAP_MAX_", -4, 0),  # M_MMAP_MAX: no block gets an mmap of its own
    "trim_threshold": ("MALLOC_TRIM_THRESHOLD_", -1, _TRIM_BYTES),  # M_TRIM_THRESHOLD: the heap is not trimmed
}


def enabled() -> bool:
    """Whether ``SPNTUNE_MALLOC_REUSE`` asks for the settings (default yes); a bad value is refused."""
    raw = os.environ.get(ENV_VAR, "1").strip()
    if raw not in ("0", "1"):
        raise ConfigError(f"{ENV_VAR} must be 1 (reuse freed memory, the default) or 0 (glibc's defaults), got {raw!r}")
    return raw == "1"


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None  # e.g. "glibc 2.36"; None or an error elsewhere
    except (ValueError, OSError):
        return False


def worker_env() -> dict[str, str]:
    """Environment variables that give a process started with them the settings: empty when
    ``SPNTUNE_MALLOC_REUSE=0`` or off glibc; a variable set in this process's environment is left out
    (a process started from here inherits the user's value)."""
    if not enabled() or not _glibc():
        return {}
    return {var: str(value) for var, _, value in SETTINGS.values() if var not in os.environ}


def reuse_freed_memory() -> bool:
    """Applies the settings to this process with ``mallopt``; True where all were taken. Call it before
    threads start: a thread that has allocated already keeps its own arena. A setting whose variable
    the environment sets is left to that variable (glibc read it at start)."""
    if not enabled() or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    taken = [mallopt(param, value) == 1 for var, param, value in SETTINGS.values() if var not in os.environ]
    return all(taken)
