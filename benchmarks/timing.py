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


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 3) -> dict[str, float]:
    """``timeit`` of each function, ``rounds`` times in turn (a, b, a, b, ...), the fastest per function.

    For ratios of two timings (forward+backward over forward): timed one after the other, a change in the
    machine's load between the two (this VM's copy bandwidth moved between 72 and 181 GB/s from run to run)
    lands in one of them only; interleaved, each gets its best over the same stretch of time."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit(fn, max(1, repeats // rounds)))
    return best
