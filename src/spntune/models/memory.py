"""Fresh CPU buffers for the propagation's largest tensors, backed by transparent huge pages where Linux
offers them.

A refiner step's neighbour weights and their gradients are ``[B, k*k-1, H, W]``: 37.7 MB at
``[4, 48, 192, 256]``, 75 MB at the CamVid default (batch 8). glibc serves any block over 32 MB with a
fresh ``mmap``, and PyTorch's CPU allocator caches nothing, so every such tensor is paged in again on
first write, one 4 KB fault at a time. Measured on the 2-core EPYC VM (``torch.empty(...).fill_(1)`` of
37.7 MB, best of 15): 12.4 ms fresh, 3.0 ms fresh after ``madvise(MADV_HUGEPAGE)``, 0.8 ms into memory
already paged in. A propagation step's forward takes 3-5 ms at that size, so the faults cost more than
the kernels.

``empty_like`` asks the kernel for huge pages over the 2 MB-aligned interior of a fresh buffer of at
least 32 MB, which glibc maps fresh unless a free block that large waits on its heap (nothing outside
the buffer is touched, no memory is added; where THP is off or not available the kernel falls back to
4 KB pages). Only the buffers the propagation code allocates itself
are advised, never a user's tensors or PyTorch's own allocations. ``SPNTUNE_HUGE_PAGES=0`` turns it off
(for a host whose THP ``defrag`` setting makes huge-page faults stall).
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache

import torch
from torch import Tensor

__all__ = ["advise_huge_pages", "empty_like"]

_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_HUGE = 2 << 20  # x86-64 / arm64 (4 KB base pages) transparent huge page size
_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: blocks this size are (almost always) fresh mappings


@cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's ``madvise`` on Linux with huge pages not turned off, else None."""
    if not sys.platform.startswith("linux") or os.environ.get("SPNTUNE_HUGE_PAGES", "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def advise_huge_pages(t: Tensor) -> bool:
    """Advise huge pages for the 2 MB-aligned interior of ``t``'s memory (a CPU tensor not yet written:
    pages already faulted in keep their size until the kernel's background collapse). Returns whether
    the advice was given; a refusal by the kernel is not an error (the buffer works either way)."""
    fn = _madvise()
    nbytes = t.numel() * t.element_size()
    if fn is None or t.device.type != "cpu" or nbytes < _MIN_BYTES or not t.is_contiguous():
        return False  # contiguous: [data_ptr, data_ptr + nbytes) is the tensor's own memory
    start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    end = (t.data_ptr() + nbytes) // _HUGE * _HUGE
    return end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0


def empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.empty_like(t, dtype=dtype)``, with huge pages advised where it is large (module docstring)."""
    out = torch.empty_like(t, dtype=dtype)
    advise_huge_pages(out)
    return out
