"""Propagation speed on the CPU (or CUDA): the backend ``propagate_step`` picks vs the shifted-slice path
and the unfold reference, and vs memory bandwidth.

Prints, for CSPN 3x3, CSPN 7x7 and DySPN 7x7 steps on a [B, C, H, W] map:
- the picked backend's (``auto``: the fused C++ kernels on CPU, Triton on CUDA) forward, forward+backward
  (every input requiring grad) and their ratio (target <= 3); its speed-up over the shifted-slice path
  (``SPNTUNE_PROPAGATION=torch``) and over unfold, and the largest allocation unfold / picked;
- the forward's effective bandwidth, counting the minimum traffic of one step (read h, h0 and the
  weights, write the output), as a fraction of three copy bandwidths: ``clone`` of the map itself (the
  issue's yardstick; 8.6 MB sits in a server CPU's L3, so this is cache bandwidth), ``copy_`` of a
  buffer moving the step's own byte count (the floor at that size: the step cannot beat it), and
  ``copy_`` of 256 MiB, larger than any cache (the memory's own speed);
- the same ratio for the kernels alone (gradient buffers preallocated: no autograd, no fresh memory),
  for T steps through ``propagate`` (forward+backward over forward, what a refiner's training costs), and
  for one step with each call timed from a cold cache (1 GiB written before it, ``timing.cache_flusher``);
- T chained steps forward+backward: picked backend step by step, shifted slices, autograd through the
  loop, unfold, and ``propagate`` (what the refiners call: on the fused CPU kernels, one autograd node
  for all T steps whose backward adds every step's neighbour-weight gradient into one buffer).

On the CPU, also at a second map size (``--pool-shape``, default ``[8, 21, 256, 256]``: 44 MB maps, larger
than a server CPU's L3; ``--pool-shape 0 0 0 0`` skips it): one step forward+backward / forward, and T steps
through ``propagate`` with and without the buffer pool of ``models/memory.py`` (``measure_pool``).

DySPN runs with factored weights (affinity x per-ring scale, ``dyspn_factored_weights``), as the refiner
does; the weight maps counted as traffic are then the k*k-1 affinities, the R ring scales and self/anchor.
The T-step rows through ``propagate`` form every step's weights from the guidance with the refiner's own
``step_weights`` (``refiner_and_guidance``; for DySPN on the C++ kernels one autograd node, its attention's
sigmoid included), so they time what a trial runs.
Every time is the fastest of ``repeats`` calls (``timing.timeit``); the two times of each
forward+backward / forward ratio are taken interleaved, in rounds (``timing.timeit_interleaved``), and so
is the clone that the forward's fraction of clone bandwidth divides by.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timing import cache_flusher, malloc_settings, timeit, timeit_interleaved
from torch.utils._python_dispatch import TorchDispatchMode

from spntune.models import memory
from spntune.models.propagation import (
    _accumulate,
    _chosen_backend,
    cspn_weights,
    dyspn_factored_weights,
    dyspn_ring_sums,
    dyspn_weights,
    num_rings,
    propagate,
    propagate_step,
    propagate_step_reference,
    set_propagation_backend,
)
from spntune.models.refiners import REFINERS


class PeakAlloc(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t._base is None:
                self.peak = max(self.peak, t.numel() * t.element_size())
        return out


def _weights(name: str, k: int, aff: torch.Tensor, att: torch.Tensor, factored: bool = True) -> tuple:  # type: ignore[type-arg]
    """CSPN's weights, or DySPN's: factored (what the refiner runs: ``propagate_step(..., ring_scale)``)
    or materialised (``[B, k*k-1, H, W]`` neighbour weights, for the paths that take no ring scale)."""
    if name == "cspn":
        return cspn_weights(aff)
    return dyspn_factored_weights(aff, att, k) if factored else dyspn_weights(aff, att, k)


def first_step_weights(name: str, k: int, aff: torch.Tensor, att: torch.Tensor) -> tuple:  # type: ignore[type-arg]
    """The first step's factored weights: ``_weights`` of ``att``'s first R+1 channels (with ``att`` laid out
    as ``step_weights`` takes it, DySPN's step-0 attention; CSPN ignores it)."""
    return _weights(name, k, aff, att[:, : num_rings(k) + 1])


def step_weights(name: str, k: int, aff: torch.Tensor, att: torch.Tensor, iterations: int,
                  factored: bool = True) -> list[tuple]:  # type: ignore[type-arg]  # fmt: skip
    """Every step's weights for T steps, as the refiners form them: CSPN one affinity map for all steps;
    DySPN one affinity with its ring sums computed once, and each step's own attention, ``att``'s channels
    ``[t * (R+1), (t+1) * (R+1))`` (``DySPNRefiner.step_weights``; materialised per step where not
    ``factored``)."""
    if name == "cspn":
        return [cspn_weights(aff)] * iterations
    per_step = att.shape[1] // iterations
    attention = att.split(per_step, dim=1)[:iterations]
    if not factored:
        return [dyspn_weights(aff, a, k) for a in attention]
    ring_sums = dyspn_ring_sums(aff, k)
    return [dyspn_factored_weights(aff, a, k, ring_sums) for a in attention]


def _terms(weights: tuple) -> tuple[bool, bool, bool]:  # type: ignore[type-arg]
    """Which of the self weight, the anchor weight and DySPN's ring scale a ``_weights`` tuple holds: the
    arguments ``step_bytes`` and ``step_multiply_adds`` take after ``k``."""
    return weights[1] is not None, weights[2] is not None, len(weights) > 3


def _call(step, h, x0, weights: tuple, k: int) -> torch.Tensor:  # type: ignore[no-untyped-def, type-arg]
    return step(h, x0, *weights[:3], k, *weights[3:])


def _fwd_bwd(step, x0, aff, att, name: str, k: int, iterations: int, factored: bool) -> None:  # type: ignore[no-untyped-def]
    aff, att = aff.detach().requires_grad_(), att.detach().requires_grad_()
    h = x0
    for weights in step_weights(name, k, aff, att, iterations, factored):
        h = _call(step, h, x0, weights, k)
    h.sum().backward()


def refiner_and_guidance(name: str, k: int, aff: torch.Tensor, att: torch.Tensor, iterations: int,
                         classes: int) -> tuple[Any, torch.Tensor]:  # fmt: skip
    """The refiner of ``name`` (``REFINERS``) and the guidance it would take for these weights: CSPN's is the
    affinity; DySPN's the affinity, then each step's attention logits (``att``'s logit: the refiner takes their
    sigmoid). Its ``step_weights`` of that guidance is how a trial forms every step's weights: for DySPN on the
    C++ kernels one autograd node (``propagation.dyspn_guidance_weights``), elsewhere op by op."""
    refiner = REFINERS[name](classes, kernel_size=k, iterations=iterations)
    if name == "cspn":
        return refiner, aff
    logits = torch.logit(att[:, : (num_rings(k) + 1) * iterations], eps=1e-6)
    return refiner, torch.cat([aff, logits], dim=1)


def _propagate_fwd_bwd(x0: torch.Tensor, refiner: Any, guidance: torch.Tensor) -> None:
    """T steps through ``propagate`` with their weights, as a trial runs them (``refiner_and_guidance``):
    one autograd node on the fused CPU kernels (the neighbour weights are one tensor for every step), step
    by step elsewhere."""
    guidance = guidance.detach().requires_grad_()
    h, _ = propagate(x0, refiner.step_weights(guidance), refiner.kernel_size)
    h.sum().backward()


def _step_fwd_bwd(step, x: torch.Tensor, x0: torch.Tensor, weights: tuple, k: int) -> None:  # type: ignore[no-untyped-def, type-arg]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, x0, *weights)]
    out = _call(step, leaves[0], leaves[1], tuple(leaves[2:]), k)
    out.backward(x0)


def _step_times(x: torch.Tensor, x0: torch.Tensor, weights: tuple, k: int, repeats: int) -> tuple[float, float, float]:  # type: ignore[type-arg]
    """Seconds of one step's forward, of its forward+backward through ``propagate_step`` and of a ``clone``
    of the map, interleaved (``timeit_interleaved``): the forward's ratios to the other two are targets, each
    measured over the same stretch of time (the map's clone, which runs in cache, moved between 69 and 181
    GB/s from run to run on the EPYC VM when it was timed once, before the cases)."""
    best = timeit_interleaved({"forward": partial(_call, propagate_step, x, x0, weights, k),
                               "step": partial(_step_fwd_bwd, propagate_step, x, x0, weights, k),
                               "clone": x.clone}, repeats)  # fmt: skip
    return best["forward"], best["step"], best["clone"]


def _cold_step_times(x: torch.Tensor, x0: torch.Tensor, weights: tuple, k: int, repeats: int,  # type: ignore[type-arg]
                     flush: Callable[[], object]) -> tuple[float, float]:  # fmt: skip
    """``_step_times``' forward and forward+backward, each call after ``flush`` (``timing.cache_flusher``):
    what the step costs when its data comes from memory, as in a training step, where the rest of the network
    runs between two calls. Timed back to back, the forward finds much of its data in the cache left by the
    call before (on the Xeon VM the host's 480 MB L3 holds all of it), the backward, which moves twice the
    bytes, less of it."""
    best = timeit_interleaved({"forward": partial(_call, propagate_step, x, x0, weights, k),
                               "step": partial(_step_fwd_bwd, propagate_step, x, x0, weights, k)},
                              repeats, before=flush)  # fmt: skip
    return best["forward"], best["step"]


def _clone_bandwidth(x: torch.Tensor, seconds: float) -> float:
    """Bytes per second of a ``clone`` of ``x`` that took ``seconds`` (read + write)."""
    return 2 * x.numel() * x.element_size() / seconds


def _propagate_forward(x0: torch.Tensor, refiner: Any, guidance: torch.Tensor) -> None:
    """T steps through ``propagate`` without autograd (the weights included, as in ``_propagate_fwd_bwd``)."""
    with torch.no_grad():
        propagate(x0, refiner.step_weights(guidance), refiner.kernel_size)


def _kernel_times(backend: str, x, x0, weights: tuple, k: int, repeats: int) -> dict[str, float] | None:  # type: ignore[no-untyped-def, type-arg]
    """One step's forward and backward seconds on the backend's kernels alone, every gradient buffer
    preallocated: what the step costs without autograd and without paging in fresh gradient memory. On the C++
    kernels also the streaming floor of each (``cpu_propagation.stream_rows``: the same maps read and written
    row by row in the kernels' order, no arithmetic), all four timed interleaved. None where no kernels ran."""
    try:
        if backend == "cpp":
            from spntune.models import cpu_propagation as kernels

            if kernels.library() is None:  # no compiler: propagate_step fell back to shifted slices
                return None
        elif backend == "triton":
            from spntune.models import triton_propagation as kernels
        else:
            return None
    except ImportError:  # no triton: propagate_step fell back too
        return None
    nw, sw, aw = weights[:3]
    rs = weights[3] if len(weights) > 3 else None
    nw, sw, aw, rs = (t.contiguous() if t is not None else None for t in (nw, sw, aw, rs))
    grads = [torch.zeros_like(t) if t is not None else None for t in (x, x0, nw, rs, sw, aw)]
    fns = {
        "forward": lambda: kernels.forward_step(x, x0, nw, sw, aw, rs, k),
        "backward": lambda: kernels.backward_step(x0, x, x0, nw, rs, sw, aw, *grads, kernel_size=k, accumulate=False),
    }  # fmt: skip
    if backend == "cpp" and x.dtype == torch.float32:
        maps = [t for t in (nw, rs, sw, aw) if t is not None]
        h0 = [x0] if aw is not None else []  # read (and its gradient written) only with an anchor weight
        fwd_in, fwd_out = [x, *h0, *maps], [torch.empty_like(x)]
        bwd_in = [x0, x, *h0, *maps]  # g, h, h0 and the weight maps
        bwd_out = [grads[0], *([grads[1]] if aw is not None else []), *[g for g in grads[2:] if g is not None]]
        fns["forward floor"] = lambda: kernels.stream_rows(fwd_in, fwd_out)
        fns["backward floor"] = lambda: kernels.stream_rows(bwd_in, bwd_out)
    return timeit_interleaved(fns, repeats)


def _shifted_slice(*args: Any) -> torch.Tensor:
    """``propagate_step`` forced onto the shifted-slice path."""
    set_propagation_backend("torch")
    try:
        return propagate_step(*args)
    finally:
        set_propagation_backend(None)


def _copy_floor_s(nbytes: int, repeats: int, device: torch.device) -> float:
    """Seconds a ``copy_`` takes to move ``nbytes`` (read half, write half) between preallocated buffers.

    The source is written first: pages of a CPU buffer never written are all mapped to the kernel's one zero
    page, which reads from the cache. With an untouched source (before stop 32) the 256 MiB copy ran at 35
    GB/s against 25 GB/s from a written one (2-core Zen 3 VM, interleaved), so the memory floor was too
    fast by about 1.4x."""
    src = torch.ones(max(1, nbytes // 8), device=device)
    dst = torch.empty_like(src)
    return timeit(lambda: dst.copy_(src), repeats)


def matmul_fma_rate(device: torch.device, repeats: int, n: int = 1024) -> float:
    """Multiply-adds per second of an ``n x n`` float32 matmul (MKL / oneDNN on the CPU, cuBLAS on CUDA) on the
    threads the kernels use: the FMA rate this machine reaches in practice, the compute roof of the roofline."""
    a = torch.randn(n, n, device=device)
    b = torch.randn_like(a)
    return n**3 / timeit(lambda: a @ b, repeats)


def step_multiply_adds(shape: tuple[int, int, int, int], k: int, self_weight: bool, anchor_weight: bool,
                       factored: bool) -> tuple[int, int]:  # fmt: skip
    """Multiply-adds of one step's forward and of its backward (every gradient), counted from the formulas the
    kernels compute (not measured). Per pixel and channel the forward does k*k-1 neighbour terms plus the self
    and anchor terms; the backward the gather for ``grad_h`` (k*k-1, + self), the k*k-1 weight gradients, the
    self and anchor weight gradients and ``grad_h0``. Factored (DySPN) weights add k*k-1 per pixel to the
    forward (affinity x ring scale) and 3 (k*k-1) to the backward (the product for the gather, the affinity's
    and the ring scale's gradients). For CSPN the backward is exactly twice the forward: at one FMA rate for
    both, forward+backward / forward is 3.0; for DySPN 3 + (k*k-1) / forward's count per pixel."""
    b, c, h, w = shape
    taps = k * k - 1
    extra = int(self_weight) + int(anchor_weight)
    fwd = b * h * w * (c * (taps + extra) + (taps if factored else 0))
    bwd = b * h * w * (c * (2 * taps + 2 * extra) + (3 * taps if factored else 0))
    return fwd, bwd


def step_bytes(shape: tuple[int, int, int, int], k: int, self_weight: bool, anchor_weight: bool, factored: bool,
               element_size: int = 4) -> tuple[int, int]:  # fmt: skip
    """Bytes one step's forward and its backward (every gradient) must move at least, each map read or
    written once (no write-allocate counted). Forward: reads h, h0, the k*k-1 neighbour weights, the self
    and anchor weights (and DySPN's ring scales), writes the output. Backward: reads g, h (the weight
    gradients), h0 (the anchor's), every weight (the gather for ``grad_h``); writes ``grad_h``, ``grad_h0`` and
    one gradient per weight map. With C channels and W weight maps: forward 3C + W maps, backward 5C + 2W,
    so forward+backward / forward is below 3 (2.74 for CSPN 3x3 at C = 11): bytes alone do not forbid the
    ``<= 3`` target, multiply-adds (``step_multiply_adds``) put it at 3.0."""
    b, c, h, w = shape
    maps = (k * k - 1) + int(self_weight) + int(anchor_weight) + (num_rings(k) if factored else 0)
    plane = b * h * w * element_size
    return (3 * c + maps) * plane, (5 * c + 2 * maps) * plane


def measure_pool(shape: tuple[int, int, int, int] = (8, 21, 256, 256), repeats: int = 2,
                 iterations: int = 6) -> dict[str, dict[str, float]]:  # fmt: skip
    """T steps through ``propagate`` forward+backward on the CPU at a map of over 32 MB (the default:
    44 MB, a VOC-sized batch), with the buffer pool (``models/memory.py``) and without it
    (``SPNTUNE_BUFFER_POOL_MB=0``: each step's output, gradient and weight buffers fresh from glibc, which
    maps blocks of 32 MB and more anew and pages them in on first write), alternating twice in this
    process; ms per case. Also, with the pool, one step's forward and forward+backward (the ``<= 3`` ratio
    at maps larger than a server CPU's L3, where the small shape's inputs partly stay in cache between
    calls and its forward, with the smaller working set, gains more from that), and the forward's fraction
    of the map's clone bandwidth (``forward_of_clone_bandwidth``; the clone timed alongside)."""
    b, c, h, w = shape
    torch.manual_seed(0)
    x0 = torch.randn(b, c, h, w)
    x = torch.randn_like(x0)
    saved = os.environ.get("SPNTUNE_BUFFER_POOL_MB")
    out: dict[str, dict[str, float]] = {}
    try:
        for name, k in (("cspn", 3), ("cspn", 7), ("dyspn", 7)):
            aff = torch.randn(b, k * k - 1, h, w)
            att = torch.rand(b, (num_rings(k) + 1) * iterations, h, w)
            trial = refiner_and_guidance(name, k, aff, att, iterations, c)
            best = {"pool_ms": float("inf"), "no_pool_ms": float("inf")}
            for order in (("0", None), (None, "0")):
                for setting in order:
                    if setting is None:
                        os.environ.pop("SPNTUNE_BUFFER_POOL_MB", None)
                    else:
                        os.environ["SPNTUNE_BUFFER_POOL_MB"] = setting
                    s = timeit(partial(_propagate_fwd_bwd, x0, *trial), repeats)
                    key = "no_pool_ms" if setting else "pool_ms"
                    best[key] = min(best[key], 1000 * s)
            os.environ.pop("SPNTUNE_BUFFER_POOL_MB", None)  # the pool on (the loop ended with it off)
            weights = first_step_weights(name, k, aff, att)
            fwd_s, step_s, clone_s = _step_times(x, x0, weights, k, 4 * repeats)
            best["step_forward_ms"], best["step_fwd_bwd_ms"] = 1000 * fwd_s, 1000 * step_s
            # the forward's fraction of the map's clone bandwidth where the map (44 MB) is larger than the L3:
            # the clone runs at memory speed here, not at cache speed as at the make bench shape
            best["forward_of_clone_bandwidth"] = (
                step_bytes(shape, k, *_terms(weights))[0] / fwd_s / _clone_bandwidth(x, clone_s)
            )
            out[f"{name}_{k}x{k}"] = best
    finally:
        if saved is None:
            os.environ.pop("SPNTUNE_BUFFER_POOL_MB", None)
        else:
            os.environ["SPNTUNE_BUFFER_POOL_MB"] = saved
        memory.release_buffers()  # the free 44 MB blocks kept would count against the benchmarks after this
    return out


def measure(shape: tuple[int, int, int, int] = (4, 11, 192, 256), repeats: int = 5, iterations: int = 6,
            device: str = "cpu", pool_shape: tuple[int, int, int, int] | None = (8, 21, 256, 256),
            flush_bytes: int = 1 << 30) -> dict[str, Any]:  # fmt: skip
    """Every number this benchmark prints, measured in one run: per case (``cspn_3x3``, ...) the picked
    backend's step forward and forward+backward ms and their ratio, the forward's fraction of the map's
    ``clone`` bandwidth and of the same-bytes ``copy_`` floor, speed-ups over the shifted-slice path and
    unfold, the allocation ratio, and T-step forward+backward per implementation; on the CPU also
    ``measure_pool`` at ``pool_shape`` (None: not measured). The cold-cache times write ``flush_bytes``
    before each call."""
    b, c, h, w = shape
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, device=dev)
    x0 = torch.randn_like(x)
    copy_bw = _clone_bandwidth(x, timeit(x.clone, repeats * 4))
    # a copy_ between two 256 MiB buffers, too large for a CPU's L3 or a GPU's L2: the memory's own speed (the
    # map's clone can run in cache, 8.6 MB against a 32 MB L3 on the EPYC VM)
    memory_bw = (512 << 20) / _copy_floor_s(512 << 20, repeats, dev)
    fma_rate = matmul_fma_rate(dev, repeats * 2)
    flush = cache_flusher(dev, flush_bytes)
    backend = _chosen_backend()
    if backend == "auto":
        backend = "triton" if dev.type == "cuda" else "cpp"
    out: dict[str, Any] = {"device": str(dev), "shape": list(shape), "threads": torch.get_num_threads(),
                           "backend": backend, "clone_gbps": copy_bw / 1e9, "memory_copy_gbps": memory_bw / 1e9,
                           "matmul_gfma_per_s": fma_rate / 1e9, "iterations": iterations, "cases": {}}  # fmt: skip
    for name, k in (("cspn", 3), ("cspn", 7), ("dyspn", 7)):
        aff = torch.randn(b, k * k - 1, h, w, device=dev)
        att = torch.rand(b, (num_rings(k) + 1) * iterations, h, w, device=dev)  # DySPN: each step's attention
        weights = first_step_weights(name, k, aff, att)
        present = _terms(weights)
        min_bytes, bwd_bytes = step_bytes(shape, k, *present)
        floor_s = _copy_floor_s(min_bytes, repeats * 2, dev)
        fast_s, step_s, clone_s = _step_times(x, x0, weights, k, repeats * 3)
        clone_bw = _clone_bandwidth(x, clone_s)  # timed alongside the forward
        slice_s = timeit(partial(_call, _shifted_slice, x, x0, weights, k), repeats)
        ref_s = timeit(partial(_call, propagate_step_reference, x, x0, weights, k), max(1, repeats // 2))
        peaks = []
        for fn in (propagate_step, propagate_step_reference):
            mode = PeakAlloc()
            with mode:
                _call(fn, x, x0, weights, k)
            peaks.append(mode.peak)
        slice_step_s = timeit(partial(_step_fwd_bwd, _shifted_slice, x, x0, weights, k), repeats)
        steps = {"picked": (propagate_step, True), "shifted slice": (_shifted_slice, True),
                 "autograd through loop": (_accumulate, False), "unfold": (propagate_step_reference, True)}  # fmt: skip
        chains = {label: partial(_fwd_bwd, step, x0, aff, att, name, k, iterations, factored)
                  for label, (step, factored) in steps.items()}  # fmt: skip
        trial = refiner_and_guidance(name, k, aff, att, iterations, c)
        chains["propagate"] = partial(_propagate_fwd_bwd, x0, *trial)
        # The ratios near 1 (step by step / propagate, shifted slices / picked) interleaved: timed one after the
        # other, the DySPN 7x7 step by step / propagate row once read 0.66 where interleaved it was 0.96-1.03.
        # The slow references (10-30x) are timed once each.
        close = ("picked", "shifted slice", "propagate")
        train = timeit_interleaved({label: chains[label] for label in close}, max(3, repeats // 2))
        train |= {label: timeit(fn, max(1, repeats // 2)) for label, fn in chains.items() if label not in close}
        prop_fwd_s = timeit(partial(_propagate_forward, x0, *trial), repeats)
        kernel = _kernel_times(backend, x, x0, weights, k, repeats * 2) or {}
        kernel_ratio = (kernel["forward"] + kernel["backward"]) / kernel["forward"] if kernel else None
        floors = {}
        if "forward floor" in kernel:  # the C++ kernels: each pass against its streaming floor
            ff, bf = kernel["forward floor"], kernel["backward floor"]
            floors = {"kernel_forward_ms": 1000 * kernel["forward"], "kernel_backward_ms": 1000 * kernel["backward"],
                      "forward_streaming_floor_ms": 1000 * ff, "backward_streaming_floor_ms": 1000 * bf,
                      "kernel_forward_of_streaming_floor": ff / kernel["forward"],
                      "kernel_backward_of_streaming_floor": bf / kernel["backward"],
                      "streaming_floor_fwd_bwd_over_fwd": (ff + bf) / ff}  # fmt: skip
        cold_fwd_s, cold_step_s = _cold_step_times(x, x0, weights, k, repeats * 2, flush)
        # the roofline's compute side: the forward's multiply-adds at matmul's FMA rate, and the forward at one
        # batch item (1/B of the working set: inside a server CPU's L3 at the bench shape)
        fwd_fma, bwd_fma = step_multiply_adds(shape, k, *present)
        compute_floor_s = fwd_fma / fma_rate
        memory_floor_s = min_bytes / memory_bw  # the step's bytes at a 256 MiB copy's bandwidth
        target_s = min_bytes / (0.5 * clone_bw)
        one = (slice(0, 1),)
        one_s = timeit(partial(_call, propagate_step, x[one], x0[one],
                               tuple(t[one] if t is not None else None for t in weights), k), repeats * 2)  # fmt: skip
        out["cases"][f"{name}_{k}x{k}"] = {
            "forward_ms": 1000 * fast_s, "forward_backward_ms": 1000 * step_s, "fwd_bwd_over_fwd": step_s / fast_s,
            "clone_gbps": clone_bw / 1e9, "forward_of_clone_bandwidth": min_bytes / fast_s / clone_bw,
            "copy_floor_ms": 1000 * floor_s,
            "forward_of_copy_floor": floor_s / fast_s, "shifted_slice_forward_ms": 1000 * slice_s,
            "forward_of_memory_copy_bandwidth": memory_floor_s / fast_s,
            "speedup_over_shifted_slice": slice_s / fast_s,
            "fwd_bwd_speedup_over_shifted_slice": slice_step_s / step_s, "unfold_ms": 1000 * ref_s,
            "speedup_over_unfold": ref_s / fast_s, "alloc_unfold_over_fast": peaks[1] / peaks[0],
            "T_fwd_bwd_ms": {label: 1000 * t for label, t in train.items()},
            "T_propagate_forward_ms": 1000 * prop_fwd_s,
            "T_propagate_fwd_bwd_over_fwd": train["propagate"] / prop_fwd_s,
            "kernel_fwd_bwd_over_fwd": kernel_ratio,
            **floors,
            "cold_forward_ms": 1000 * cold_fwd_s, "cold_forward_backward_ms": 1000 * cold_step_s,
            "cold_fwd_bwd_over_fwd": cold_step_s / cold_fwd_s,
            "forward_multiply_adds": fwd_fma, "backward_multiply_adds": bwd_fma,
            "fwd_bwd_over_fwd_in_multiply_adds": (fwd_fma + bwd_fma) / fwd_fma,
            "forward_bytes": min_bytes, "backward_bytes": bwd_bytes,
            "fwd_bwd_over_fwd_in_bytes": (min_bytes + bwd_bytes) / min_bytes,
            "compute_floor_ms": 1000 * compute_floor_s, "forward_of_compute_floor": compute_floor_s / fast_s,
            "target_ms": 1000 * target_s, "target_over_compute_floor": target_s / compute_floor_s,
            "memory_floor_ms": 1000 * memory_floor_s, "target_over_memory_floor": target_s / memory_floor_s,
            "one_item_forward_ms": 1000 * one_s,
            "one_item_forward_of_matmul_fma_rate": fwd_fma / b / one_s / fma_rate,
        }  # fmt: skip
    if dev.type == "cpu" and pool_shape is not None:
        out["pool_shape"] = list(pool_shape)
        out["pool"] = measure_pool(pool_shape, max(1, repeats // 2), iterations)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 11, 192, 256], metavar=("B", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=6, help="T for the forward+backward timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pool-shape", type=int, nargs=4, default=[8, 21, 256, 256], metavar=("B", "C", "H", "W"),
                        help="the second map size (CPU only); 0 0 0 0 skips it")  # fmt: skip
    args = parser.parse_args(argv)
    malloc = malloc_settings()
    pool_shape = tuple(args.pool_shape) if all(args.pool_shape) else None
    r = measure(tuple(args.shape), args.repeats, args.iterations, args.device, pool_shape)
    print(f"device {r['device']} ({r['threads']} threads), backend {r['backend']}, map [B,C,H,W] = {args.shape}; "
          f"clone bandwidth of the map {r['clone_gbps']:.1f} GB/s (before the cases), copy of 256 MiB {r['memory_copy_gbps']:.1f} GB/s, "
          f"matmul {r['matmul_gfma_per_s']:.1f} GFMA/s; malloc: {malloc}")  # fmt: skip
    for case, m in r["cases"].items():
        print(
            f"{case} one step: forward {m['forward_ms']:.2f} ms, forward+backward {m['forward_backward_ms']:.2f} ms, "
            f"ratio {m['fwd_bwd_over_fwd']:.1f}x (target <= 3); forward at {m['forward_of_clone_bandwidth']:.2f} of "
            f"the map's clone bandwidth ({m['clone_gbps']:.1f} GB/s alongside; target >= 0.5), at {m['forward_of_copy_floor']:.2f} of the same-bytes copy "
            f"floor ({m['copy_floor_ms']:.2f} ms), at {m['forward_of_memory_copy_bandwidth']:.2f} of a 256 MiB copy's bandwidth"
        )
        print(
            f"{case} forward: {m['forward_ms']:.2f} ms; shifted slices {m['shifted_slice_forward_ms']:.2f} ms "
            f"({m['speedup_over_shifted_slice']:.1f}x), unfold {m['unfold_ms']:.1f} ms ({m['speedup_over_unfold']:.1f}x); "
            f"forward+backward {m['fwd_bwd_speedup_over_shifted_slice']:.1f}x faster than shifted slices; "
            f"largest allocation unfold/picked {m['alloc_unfold_over_fast']:.1f}x"
        )
        kr = m["kernel_fwd_bwd_over_fwd"]
        print(f"{case} forward+backward / forward: one step {m['fwd_bwd_over_fwd']:.1f}x, its kernels alone "
              + (f"{kr:.1f}x" if kr is not None else "n/a")
              + f", T={args.iterations} propagate {m['T_propagate_fwd_bwd_over_fwd']:.1f}x; each call from a cold "
              f"cache: forward {m['cold_forward_ms']:.2f} ms, forward+backward {m['cold_forward_backward_ms']:.2f} ms, "
              f"{m['cold_fwd_bwd_over_fwd']:.1f}x")  # fmt: skip
        print(
            f"{case} roofline: forward {m['forward_multiply_adds'] / 1e6:.0f} M multiply-adds, {m['compute_floor_ms']:.2f} ms "
            f"at matmul's FMA rate (the forward at {m['forward_of_compute_floor']:.2f} of that floor; one batch item "
            f"at {m['one_item_forward_of_matmul_fma_rate']:.2f} of the rate); the target's forward time "
            f"{m['target_ms']:.2f} ms is {m['target_over_compute_floor']:.2f}x the compute floor and "
            f"{m['target_over_memory_floor']:.2f}x the memory floor (its bytes at a 256 MiB copy's bandwidth, "
            f"{m['memory_floor_ms']:.2f} ms); forward+backward / "
            f"forward counted in multiply-adds {m['fwd_bwd_over_fwd_in_multiply_adds']:.2f}, in bytes "
            f"{m['fwd_bwd_over_fwd_in_bytes']:.2f}"
        )
        if "forward_streaming_floor_ms" in m:
            print(f"{case} streaming floor (the step's maps read and written row by row, no arithmetic): forward "
                  f"{m['forward_streaming_floor_ms']:.2f} ms, backward {m['backward_streaming_floor_ms']:.2f} ms, their "
                  f"(forward+backward) / forward {m['streaming_floor_fwd_bwd_over_fwd']:.2f}; the kernels alone: forward "
                  f"{m['kernel_forward_ms']:.2f} ms at {m['kernel_forward_of_streaming_floor']:.2f} of its floor, backward "
                  f"{m['kernel_backward_ms']:.2f} ms at {m['kernel_backward_of_streaming_floor']:.2f}")  # fmt: skip
        base = m["T_fwd_bwd_ms"]["picked"]
        print(f"{case} T={args.iterations} forward+backward: "
              + ", ".join(f"{lbl} {t:.0f} ms ({t / base:.1f}x)" for lbl, t in m["T_fwd_bwd_ms"].items()))  # fmt: skip
    for case, p in r.get("pool", {}).items():
        print(
            f"{case} T={args.iterations} forward+backward at {r['pool_shape']}: with the buffer pool "
            f"{p['pool_ms']:.0f} ms, without {p['no_pool_ms']:.0f} ms ({p['no_pool_ms'] / p['pool_ms']:.2f}x); "
            f"one step forward {p['step_forward_ms']:.1f} ms, forward+backward {p['step_fwd_bwd_ms']:.1f} ms "
            f"({p['step_fwd_bwd_ms'] / p['step_forward_ms']:.2f}x), forward at {p['forward_of_clone_bandwidth']:.2f} of "
            "the map's clone bandwidth"
        )


if __name__ == "__main__":
    main()
