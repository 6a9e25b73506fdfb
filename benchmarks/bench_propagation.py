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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 11, 192, 256], metavar=("B", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=6, help="T for the forward+backward timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    b, c, h, w = args.shape
    dev = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, device=dev)
    x0 = torch.randn_like(x)
    copy_s = timeit(lambda: x.clone(), args.repeats * 4)
    copy_bw = 2 * x.numel() * 4 / copy_s  # read + write
    print(f"device {dev}, map [B,C,H,W] = {args.shape}; clone bandwidth {copy_bw / 1e9:.1f} GB/s")
    for name, k in (("cspn", 3), ("cspn", 7), ("dyspn", 7)):
        aff = torch.randn(b, k * k - 1, h, w, device=dev)
        att = torch.rand(b, num_rings(k) + 1, h, w, device=dev)
        weights = _weights(name, k, aff, att)
        n_maps = (k * k - 1) + (1 if name == "cspn" else 2)  # neighbour + self/anchor weight maps
        min_bytes = (3 * x.numel() + n_maps * b * h * w) * 4  # read h, h0, weights; write out
        fast_s = timeit(partial(propagate_step, x, x0, *weights, k), args.repeats)
        ref_s = timeit(partial(propagate_step_reference, x, x0, *weights, k), max(1, args.repeats // 2))
        peaks = []
        for fn in (propagate_step, propagate_step_reference):
            mode = PeakAlloc()
            with mode:
                fn(x, x0, *weights, k)
            peaks.append(mode.peak)
        eff = min_bytes / fast_s / copy_bw
        step_s = timeit(partial(_step_fwd_bwd, x, x0, weights, k), args.repeats)
        print(
            f"{name} {k}x{k} one step: forward {1000 * fast_s:.1f} ms, forward+backward {1000 * step_s:.1f} ms, "
            f"ratio {step_s / fast_s:.1f}x (target <= 3); forward at {min_bytes / fast_s / copy_bw:.2f} of clone "
            f"bandwidth (target >= 0.5)"
        )
        print(
            f"{name} {k}x{k} forward: fast {1000 * fast_s:.1f} ms, unfold {1000 * ref_s:.1f} ms -> "
            f"speed-up {ref_s / fast_s:.1f}x; largest allocation unfold/fast {peaks[1] / peaks[0]:.1f}x; "
            f"effective bandwidth {eff:.2f} of clone"
        )
        steps = {
            "custom backward": propagate_step,
            "autograd through loop": _accumulate,
            "unfold": propagate_step_reference,
        }
        train = {
            label: timeit(partial(_fwd_bwd, step, x0, aff, att, name, k, args.iterations), max(1, args.repeats // 2))
            for label, step in steps.items()
        }
        base = train["custom backward"]
        print(
            f"{name} {k}x{k} T={args.iterations} forward+backward: "
            + ", ".join(f"{lbl} {1000 * t:.0f} ms ({t / base:.1f}x)" for lbl, t in train.items())
        )


if __name__ == "__main__":
    main()
