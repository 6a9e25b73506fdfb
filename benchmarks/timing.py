"""The one timer of every benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call (builds / compiles kernels).

    The minimum, not the mean: on a shared machine noise only ever adds time, and the ratios a benchmark
    prints compare best against best. CUDA work is synchronised before and after each call.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
