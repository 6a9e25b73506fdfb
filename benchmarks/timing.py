"""The one timer of every benchmark, and the malloc settings they are timed with."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from spntune import allocator


def malloc_settings() -> str:
    """Applies ``spntune/allocator.py``'s malloc settings to this process, as trials and ``spntune train`` run
    (call it before threads start), and names what the benchmarks run with. On glibc's defaults a one-step
    forward+backward of CSPN 3x3 at ``[4, 11, 192, 256]`` took 1.2-3.9 k page faults and 2.6-8.4 ms of system
    time per step (mean step 6.1-10.6 ms), with the settings 0-160 faults, 0.0-0.5 ms (3.8-4.0 ms): the
    ratios would time the kernel paging in fresh gradient buffers, not the propagation."""
    return "reuse freed memory, as trials run" if allocator.reuse_freed_memory() else "glibc defaults"


def timeit(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call (builds / compiles kernels).

    The minimum, not the mean: on a shared machine noise only ever adds time, and the ratios a benchmark
    prints compare best against best. CUDA work is synchronised before and after each call. ``before``,
    where given, runs ahead of every call, untimed (``cache_flusher``).
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 3,
                       before: Callable[[], object] | None = None) -> dict[str, float]:  # fmt: skip
    """``timeit`` of each function, ``rounds`` times in turn (a, b, a, b, ...), the fastest per function.

    For ratios of two timings (forward+backward over forward): timed one after the other, a change in the
    machine's load between the two (this VM's copy bandwidth moved between 72 and 181 GB/s from run to run)
    lands in one of them only; interleaved, each gets its best over the same stretch of time."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit(fn, max(1, repeats // rounds), before))
    return best


def cache_flusher(device: torch.device, nbytes: int = 1 << 30) -> Callable[[], None]:
    """A function that writes ``nbytes`` (default 1 GiB: more than any cache we measured on, the 480 MB L3
    of the Xeon VM's host included) on ``device``. Run before each timed call (``timeit``'s ``before``), it
    leaves the caches holding that buffer, not the timed call's data, as the rest of a training step leaves
    them between two calls of one layer. On the Xeon VM a CSPN 3x3 step's forward at ``[4, 11, 192, 256]``
    took 0.93 ms timed back to back, 1.05 / 1.50 / 1.89 ms after writing 64 MiB / 256 MiB / 1 GiB."""
    buffer = torch.empty(nbytes // 4, device=device)
    return lambda: buffer.fill_(1.0)
