"""Propagation speed: shifted-slice fast path vs the unfold reference, and vs memory bandwidth.

Prints, for CSPN 3x3 and DySPN 7x7 steps on a [B, C, H, W] map:
- fast/unfold speed-up and peak allocation ratio (measured in this run),
- the fast path's effective bandwidth as a fraction of a plain copy's (``clone``) bandwidth, where
  "effective" counts the minimum traffic of one step: read h, h0 and the weights, write the output,
- one step's forward, forward+backward (every input requiring grad) and their ratio (target <= 3),
- T chained steps forward+backward for the custom backward, autograd through the loop and unfold.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spntune.models.propagation import (
    _accumulate,
    cspn_weights,
    dyspn_weights,
    num_rings,
    propagate_step,
    propagate_step_reference,
)


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


def timeit(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _weights(name: str, k: int, aff: torch.Tensor, att: torch.Tensor) -> tuple:  # type: ignore[type-arg]
    return cspn_weights(aff) if name == "cspn" else dyspn_weights(aff, att, k)


def _fwd_bwd(step, x0, aff, att, name: str, k: int, iterations: int) -> None:  # type: ignore[no-untyped-def]
    aff = aff.detach().requires_grad_()
    weights = _weights(name, k, aff, att)
    h = x0
    for _ in range(iterations):
        h = step(h, x0, *weights, k)
    h.sum().backward()


def _step_fwd_bwd(x: torch.Tensor, x0: torch.Tensor, weights: tuple, k: int) -> None:  # type: ignore[type-arg]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, x0, *weights)]
    out = propagate_step(*leaves, k)
    out.backward(x0)


def measure(shape: tuple[int, int, int, int] = (4, 11, 192, 256), repeats: int = 5, iterations: int = 6,
            device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Every number this benchmark prints, measured in one run: per case (``cspn_3x3``, ...) the step's
    forward and forward+backward ms and their ratio, the forward's fraction of ``clone`` bandwidth, the
    speed-up and allocation ratio over unfold, and T-step forward+backward per implementation."""
    b, c, h, w = shape
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, device=dev)
    x0 = torch.randn_like(x)
    copy_s = timeit(lambda: x.clone(), repeats * 4)
    copy_bw = 2 * x.numel() * 4 / copy_s  # read + write
    out: dict[str, Any] = {"device": str(dev), "shape": list(shape), "threads": torch.get_num_threads(),
                           "clone_gbps": copy_bw / 1e9, "iterations": iterations, "cases": {}}  # fmt: skip
    for name, k in (("cspn", 3), ("cspn", 7), ("dyspn", 7)):
        aff = torch.randn(b, k * k - 1, h, w, device=dev)
        att = torch.rand(b, num_rings(k) + 1, h, w, device=dev)
        weights = _weights(name, k, aff, att)
        n_maps = (k * k - 1) + (1 if name == "cspn" else 2)  # neighbour + self/anchor weight maps
        min_bytes = (3 * x.numel() + n_maps * b * h * w) * 4  # read h, h0, weights; write out
        fast_s = timeit(partial(propagate_step, x, x0, *weights, k), repeats)
        ref_s = timeit(partial(propagate_step_reference, x, x0, *weights, k), max(1, repeats // 2))
        peaks = []
        for fn in (propagate_step, propagate_step_reference):
            mode = PeakAlloc()
            with mode:
                fn(x, x0, *weights, k)
            peaks.append(mode.peak)
        step_s = timeit(partial(_step_fwd_bwd, x, x0, weights, k), repeats)
        steps = {"custom backward": propagate_step, "autograd through loop": _accumulate,
                 "unfold": propagate_step_reference}  # fmt: skip
        train = {
            label: timeit(partial(_fwd_bwd, step, x0, aff, att, name, k, iterations), max(1, repeats // 2))
            for label, step in steps.items()
        }
        out["cases"][f"{name}_{k}x{k}"] = {
            "forward_ms": 1000 * fast_s, "forward_backward_ms": 1000 * step_s, "fwd_bwd_over_fwd": step_s / fast_s,
            "forward_of_clone_bandwidth": min_bytes / fast_s / copy_bw, "unfold_ms": 1000 * ref_s,
            "speedup_over_unfold": ref_s / fast_s, "alloc_unfold_over_fast": peaks[1] / peaks[0],
            "T_fwd_bwd_ms": {label: 1000 * t for label, t in train.items()},
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 11, 192, 256], metavar=("B", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=6, help="T for the forward+backward timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    r = measure(tuple(args.shape), args.repeats, args.iterations, args.device)
    print(f"device {r['device']}, map [B,C,H,W] = {args.shape}; clone bandwidth {r['clone_gbps']:.1f} GB/s")
    for case, m in r["cases"].items():
        print(
            f"{case} one step: forward {m['forward_ms']:.1f} ms, forward+backward {m['forward_backward_ms']:.1f} ms, "
            f"ratio {m['fwd_bwd_over_fwd']:.1f}x (target <= 3); forward at {m['forward_of_clone_bandwidth']:.2f} of "
            "clone bandwidth (target >= 0.5)"
        )
        print(
            f"{case} forward: fast {m['forward_ms']:.1f} ms, unfold {m['unfold_ms']:.1f} ms -> speed-up "
            f"{m['speedup_over_unfold']:.1f}x; largest allocation unfold/fast {m['alloc_unfold_over_fast']:.1f}x"
        )
        base = m["T_fwd_bwd_ms"]["custom backward"]
        print(f"{case} T={args.iterations} forward+backward: "
              + ", ".join(f"{lbl} {t:.0f} ms ({t / base:.1f}x)" for lbl, t in m["T_fwd_bwd_ms"].items()))  # fmt: skip


if __name__ == "__main__":
    main()
