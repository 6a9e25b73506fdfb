"""Reused CPU buffers for the propagation's largest tensors.

A refiner step's neighbour weights and their gradients are ``[B, k*k-1, H, W]``: 37.7 MB at
``[4, 48, 192, 256]``, 75 MB at the CamVid default (batch 8); each step's output and its gradient are
``[B, C, H, W]``, 44 MB at ``[8, 21, 256, 256]`` (a VOC batch). glibc serves any block over 32 MB with a
fresh ``mmap`` and unmaps it on free, and PyTorch's CPU allocator caches nothing, so every such tensor
is paged in again on its first write, in every training step. In training on the 2-core EPYC VM
(CamVid default, U-Net/ResNet-18, DySPN 7x7, T=6, batch 8; torch profiler, two steps) that paging
made DySPN's ring-sum backward take 22 ms per step where its kernel takes 6 ms, and it was worse with
huge pages advised (88 ms, and 254 against 182 ms for the T-step backward), so this module no longer
advises them. With the maps from the pool as well, T=6 steps forward+backward at ``[8, 21, 256, 256]``
took 138 instead of 269 ms (CSPN 3x3), 365 instead of 484 (CSPN 7x7), 430 instead of 557 (DySPN 7x7),
alternating in one process (``make bench`` measures it again).

``empty_like`` hands out CPU float32 / float64 buffers of at least 32 MB from a pool of blocks kept
across calls: a block comes back to the pool when the last tensor viewing its memory is freed (a
``weakref.finalize`` on the numpy array the tensor was made from, run by CPython's reference counting
as the storage goes), and the next request of the same byte size takes it again, already paged in. The
pool keeps at most ``SPNTUNE_BUFFER_POOL_MB`` of free blocks (default 1024; ``0`` turns the pool off);
a block beyond that is freed as before. Only the buffers the propagation code allocates itself come
from the pool, never a user's tensors or PyTorch's own allocations. On other devices and for other
dtypes ``empty_like`` is ``torch.empty_like`` (contiguous). A pooled tensor's storage cannot be resized,
as a numpy-backed one's: ``resize_`` to another size, or an ``out=`` argument of another shape, raise
"Trying to resize storage that is not resizable". Nothing in spntune resizes these buffers; some leave
the propagation, though: on the CPU, ``propagate_step``'s and ``propagate``'s maps (the refiner's output)
and the gradient of ``h0`` are pooled where they reach 32 MB. Everything else (in-place arithmetic,
``torch.save``, ``share_memory_``, autograd) works on them as on any tensor.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

__all__ = ["BufferPool", "buffer_pool", "contiguous", "empty_like", "release_buffers"]

# glibc's largest mmap threshold: larger blocks are mapped afresh on every request. Smaller ones come from
# its heap, whose free top glibc trims too (a CSPN 3x3 step forward+backward at [4, 11, 192, 256], 8.6 MB
# maps, took 3,854 and 4,204 page faults per call in two runs with glibc's defaults); allocator.py's
# settings, which trials run with, keep both.
_MIN_BYTES = 32 << 20
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_DEFAULT_LIMIT_MB = 1024


class BufferPool:
    """Free CPU blocks, handed out as contiguous tensors that return to the pool when the last view of
    their memory dies (module docstring). At most ``limit_bytes`` of free blocks are kept: a block coming
    back when that is full pushes out the longest-kept ones, so sizes no longer asked for (the last,
    smaller batch of an epoch) do not stay. Thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._free: list[Tensor] = []  # longest kept first
        self._held = 0  # bytes of free blocks kept
        # Reentrant: a finalizer run by a garbage collection inside the locked code gives back on this thread.
        self._lock = threading.RLock()
        self.allocated = 0  # blocks made fresh
        self.reused = 0  # requests served by a kept block

    @property
    def held_bytes(self) -> int:
        """Bytes of free blocks the pool keeps now (blocks handed out are not counted)."""
        return self._held

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
        """An uninitialised contiguous CPU tensor from the pool, or None for a dtype it does not serve."""
        np_dtype = _NUMPY.get(dtype)
        if np_dtype is None:
            return None
        nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
        block = self._take(nbytes)
        if block is None:
            try:
                block = torch.empty(nbytes, dtype=torch.uint8)  # 64-byte aligned, as the kernels' vectors like
            except RuntimeError:  # out of memory (or a trial's memory limit): the kept blocks first
                self.clear()
                block = torch.empty(nbytes, dtype=torch.uint8)
        array = block.numpy().view(np_dtype).reshape(shape)
        # The tensor's storage holds `array` until its last view is freed; then the block comes back.
        weakref.finalize(array, self._give_back, block).atexit = False
        return torch.from_numpy(array)

    def _take(self, nbytes: int) -> Tensor | None:
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):  # the most recently kept of that size
                if self._free[i].numel() == nbytes:
                    self._held -= nbytes
                    self.reused += 1
                    return self._free.pop(i)
            self.allocated += 1
            return None

    def _give_back(self, block: Tensor) -> None:
        nbytes = block.numel()
        with self._lock:
            if nbytes > self.limit_bytes:
                return  # dropped: freed with its last reference
            while self._held + nbytes > self.limit_bytes:
                self._held -= self._free.pop(0).numel()
            self._free.append(block)
            self._held += nbytes

    def clear(self) -> None:
        """Drop every free block (their memory goes back to the system)."""
        with self._lock:
            self._free.clear()
            self._held = 0


_pool: BufferPool | None = None
_pool_limit: int | None = None


def buffer_pool() -> BufferPool | None:
    """The process's pool at ``SPNTUNE_BUFFER_POOL_MB`` (read at each call: a changed setting makes a
    new pool), or None where that is 0."""
    global _pool, _pool_limit
    raw = os.environ.get("SPNTUNE_BUFFER_POOL_MB", str(_DEFAULT_LIMIT_MB))
    try:
        limit = int(float(raw) * (1 << 20))
    except ValueError:
        raise ValueError(f"SPNTUNE_BUFFER_POOL_MB must be a number of megabytes, got {raw!r}") from None
    if limit <= 0:
        return None
    if _pool is None or limit != _pool_limit:
        _pool, _pool_limit = BufferPool(limit), limit
    return _pool


def empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous ``torch.empty_like(t, dtype=dtype)``, from the pool where it is a CPU float32 / float64
    buffer of at least 32 MB (module docstring)."""
    dtype = dtype or t.dtype
    if t.device.type == "cpu" and t.numel() * dtype.itemsize >= _MIN_BYTES:
        pool = buffer_pool()
        out = pool.empty(tuple(t.shape), dtype) if pool is not None else None
        if out is not None:
            return out
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def contiguous(t: Tensor) -> Tensor:
    """``t.contiguous()``, the copy (where one is needed: a channels-last affinity) made in ``empty_like``'s
    memory."""
    return t if t.is_contiguous() else empty_like(t).copy_(t)


def release_buffers() -> None:
    """Give the pool's free blocks back to the system (a trial's end: the next trial's sizes may differ)."""
    if _pool is not None:
        _pool.clear()
