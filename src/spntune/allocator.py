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
user's environment already sets (``MALLOC_ARENA_MAX``, ...) wins: its value is the one passed on, and
``mallopt`` leaves that setting alone. Elsewhere than glibc (macOS, musl) nothing is changed; that is
judged on the driver, so a macOS driver sends nothing to a Linux cluster's workers. With jemalloc or
tcmalloc preloaded, ``mallopt`` does nothing.

The heap is trimmed only where more than 2 GiB lies free at its top (``mallopt`` takes an int). One
arena means one lock for every thread of the process (PyTorch's intra-op threads, Ray's and MLflow's
threads): measured on 2 cores only.
Light to import: no torch.
"""

from __future__ import annotations

import ctypes
import os
import sys

from spntune.errors import ConfigError

__all__ = ["ENV_VAR", "ENV_VARS", "SETTINGS", "defaults_env", "enabled", "is_glibc", "reuse_freed_memory",
           "settings_env", "worker_env"]  # fmt: skip

ENV_VAR = "SPNTUNE_MALLOC_REUSE"

_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: the largest threshold it accepts, 2 GiB

#: name -> (environment variable glibc reads at start, mallopt parameter number, value)
SETTINGS: dict[str, tuple[str, int, int]] = {
    "arena_max": ("MALLOC_ARENA_MAX", -8, 1),  # M_ARENA_MAX: every thread allocates in the main arena
    "mmap_max": ("MALLOC_MMAP_MAX_", -4, 0),  # M_MMAP_MAX: no block gets an mmap of its own
    "trim_threshold": ("MALLOC_TRIM_THRESHOLD_", -1, _TRIM_BYTES),  # M_TRIM_THRESHOLD: trimmed above 2 GiB only
}

#: The environment variables of ``SETTINGS``, and the one that turns them off.
ENV_VARS: tuple[str, ...] = (*(var for var, _, _ in SETTINGS.values()), ENV_VAR)


def enabled() -> bool:
    """Whether ``SPNTUNE_MALLOC_REUSE`` asks for the settings (default yes); a bad value is refused."""
    raw = os.environ.get(ENV_VAR, "1").strip()
    if raw not in ("0", "1"):
        raise ConfigError(f"{ENV_VAR} must be 1 (reuse freed memory, the default) or 0 (glibc's defaults), got {raw!r}")
    return raw == "1"


def is_glibc() -> bool:
    """Whether this process runs on glibc (Linux), whose malloc the settings are for."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None  # e.g. "glibc 2.36"; None or an error elsewhere
    except (ValueError, OSError):
        return False


def settings_env() -> dict[str, str]:
    """``SETTINGS`` as the environment variables glibc reads at process start, whatever this process's
    environment or ``SPNTUNE_MALLOC_REUSE`` say (``worker_env`` heeds both)."""
    return {var: str(value) for var, _, value in SETTINGS.values()}


def defaults_env() -> dict[str, str]:
    """This process's environment without any malloc setting (``ENV_VARS``, ``GLIBC_TUNABLES``): what a
    process that is to run with glibc's defaults is started with (the benchmark's and tests' children)."""
    return {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "GLIBC_TUNABLES"}


def worker_env() -> dict[str, str]:
    """Environment variables that give a process started with them the settings: empty when
    ``SPNTUNE_MALLOC_REUSE=0`` or off glibc; where this process's environment sets one, its value (a
    cluster's workers do not inherit the driver's environment)."""
    if not enabled() or not is_glibc():
        return {}
    return {var: os.environ.get(var, value) for var, value in settings_env().items()}


def reuse_freed_memory() -> bool:
    """Applies the settings to this process with ``mallopt``; True where every one it made was taken
    (also where the environment set them all: glibc read those at start). Call it before threads
    start: a thread that has allocated already keeps its own arena. False where turned off or off
    glibc."""
    if not enabled() or not is_glibc():
        return False
    taken = [_mallopt(param, value) for var, param, value in SETTINGS.values() if var not in os.environ]
    return all(taken)


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``: whether it was taken."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(param, value) == 1)
