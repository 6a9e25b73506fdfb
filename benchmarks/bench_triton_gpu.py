"""GPU propagation speed: the fused Triton step vs the shifted-slice path, and vs HBM bandwidth.

For CSPN 3x3, CSPN 7x7 and DySPN 7x7 at each shape, prints one row with:
- forward time of both backends and the Triton speed-up,
- forward + backward time of T chained steps through ``propagate`` (weights computed once, as in the
  refiners; on triton the T steps are one autograd node) and the speed-up,
- the Triton forward's achieved bandwidth, counting the minimum bytes one step must move (read h,
  h0 and the weights once, write the output once), in GB/s and as a fraction of a measured
  ``clone`` bandwidth (the practical HBM floor).

DySPN runs with factored weights (``dyspn_factored_weights``: shared affinity times per-ring scales),
as the refiner does: Triton multiplies the two inside its kernels, the shifted-slice path builds the
``[B, k*k-1, H, W]`` product first.

Timings are wall-clock between ``torch.cuda.synchronize()`` calls. Without a GPU (or without
triton) it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from importlib.util import find_spec
from typing import Any

import torch
from bench_propagation import first_step_weights, step_weights
from timing import timeit

from spntune.models.propagation import (
    num_rings,
    propagate,
    propagate_step,
    set_propagation_backend,
)

SHAPES = ([4, 11, 192, 256], [8, 21, 512, 512])
CASES = (("cspn", 3), ("cspn", 7), ("dyspn", 7))


def _forward(x: torch.Tensor, x0: torch.Tensor, weights: tuple, k: int) -> None:  # type: ignore[type-arg]
    with torch.no_grad():
        propagate_step(x, x0, *weights[:3], k, *weights[3:])


def _train(x0: torch.Tensor, aff: torch.Tensor, att: torch.Tensor, name: str, k: int, iterations: int) -> None:
    aff, att = aff.detach().requires_grad_(), att.detach().requires_grad_()
    h, _ = propagate(x0, step_weights(name, k, aff, att, iterations), k)  # as the refiners call it: one node
    h.sum().backward()


def _backends(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    times = {}
    for backend in ("torch", "triton"):
        set_propagation_backend(backend)
        times[backend] = timeit(fn, repeats)
    set_propagation_backend(None)
    return times


def measure(repeats: int = 20, iterations: int = 6) -> dict[str, Any] | None:
    """Per shape and case: forward and T-step forward+backward, torch vs triton, and the triton
    forward's bandwidth (absolute and as a fraction of ``clone``). None without CUDA or triton."""
    if not torch.cuda.is_available() or find_spec("triton") is None:
        return None
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "iterations": iterations, "shapes": {}}
    for shape in SHAPES:
        b, c, h, w = shape
        x = torch.randn(b, c, h, w, device=dev)
        x0 = torch.randn_like(x)
        big = torch.randn(64 * 2**20, device=dev)  # 256 MiB: beyond L2, a true HBM copy
        copy_s = timeit(big.clone, repeats)
        copy_bw = 2 * big.numel() * 4 / copy_s
        del big
        cases: dict[str, Any] = {}
        for name, k in CASES:
            aff = torch.randn(b, k * k - 1, h, w, device=dev)
            att = torch.rand(b, (num_rings(k) + 1) * iterations, h, w, device=dev)  # DySPN: each step's attention
            weights = first_step_weights(name, k, aff, att)
            fwd = _backends(partial(_forward, x, x0, weights, k), repeats)
            train = _backends(partial(_train, x0, aff, att, name, k, iterations), max(1, repeats // 4))
            n_maps = (k * k - 1) + (1 if name == "cspn" else 2 + num_rings(k))  # neighbour (+ rings) + self/anchor
            min_bytes = (3 * x.numel() + n_maps * b * h * w) * 4
            bw = min_bytes / fwd["triton"]
            cases[f"{name}_{k}x{k}"] = {
                "fwd_torch_ms": 1e3 * fwd["torch"], "fwd_triton_ms": 1e3 * fwd["triton"],
                "fwd_speedup": fwd["torch"] / fwd["triton"], "train_torch_ms": 1e3 * train["torch"],
                "train_triton_ms": 1e3 * train["triton"], "train_speedup": train["torch"] / train["triton"],
                "triton_gbps": bw / 1e9, "triton_of_clone": bw / copy_bw,
            }  # fmt: skip
        out["shapes"][str(list(shape))] = {"clone_gbps": copy_bw / 1e9, "cases": cases}
        torch.cuda.empty_cache()
    return out


def _print_resources() -> None:
    """Registers and spills per thread of each kernel as ptxas builds it for this GPU (for sm_90 where there
    is none): compiled ahead of time, so this part runs on any machine with triton's NVIDIA backend."""
    if find_spec("triton") is None:
        return
    from spntune.models.triton_propagation import compiled_resources

    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    try:
        for k in (3, 7):
            rows = compiled_resources(k, 11, arch)
            print(f"sm_{arch} k={k}, 11 channels: " + ", ".join(
                f"{r['kernel']} {r['registers']} registers, {r['stack'] + r['local']} B spilled" for r in rows))  # fmt: skip
    except Exception as exc:  # the report is a bonus: never stop the timings below for it
        print(f"bench_triton_gpu: no register report ({type(exc).__name__}: {exc})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=6, help="T for the forward+backward timing")
    args = parser.parse_args(argv)
    _print_resources()
    r = measure(args.repeats, args.iterations)
    if r is None:
        print("bench_triton_gpu: no CUDA device or no triton here; nothing to measure.")
        return 0
    print(f"device {r['device']}, fp32, T={args.iterations}")
    header = (
        f"{'shape':>18} {'step':>9} | {'fwd torch':>9} {'fwd triton':>10} {'speed-up':>8} | "
        f"{'T fwd+bwd torch':>15} {'triton':>8} {'speed-up':>8} | {'GB/s':>6} {'of clone':>8}"
    )
    for shape, per in r["shapes"].items():
        print(f"\nshape {shape}: clone bandwidth {per['clone_gbps']:.0f} GB/s")
        print(header)
        for case, m in per["cases"].items():
            print(
                f"{shape:>18} {case:>9} | {m['fwd_torch_ms']:7.2f}ms {m['fwd_triton_ms']:8.2f}ms "
                f"{m['fwd_speedup']:7.1f}x | {m['train_torch_ms']:13.1f}ms {m['train_triton_ms']:6.1f}ms "
                f"{m['train_speedup']:7.1f}x | {m['triton_gbps']:6.0f} {m['triton_of_clone']:8.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
