"""GPU propagation speed: the fused Triton step vs the shifted-slice path, and vs HBM bandwidth.

For CSPN 3x3, CSPN 7x7 and DySPN 7x7 at each shape, prints one row with (``measure_case``):
- one step's forward on both backends and the Triton speed-up; Triton's one-step forward+backward /
  forward (every input requiring grad);
- T steps through ``propagate`` forward+backward on both backends and the speed-up, with every step's
  weights formed from a guidance by the refiner's own ``step_weights``, as a trial runs them
  (``bench_propagation.refiner_and_guidance``; on triton the T steps are one autograd node), and
  Triton's T-step forward+backward / forward;
- the Triton forward's achieved bandwidth, counting the minimum bytes one step must move
  (``bench_propagation.step_bytes``: read h, h0 and the weights once, write the output once), in GB/s
  and as a fraction of a measured ``clone`` of 256 MiB (the practical HBM floor).

DySPN runs with factored weights (``dyspn_factored_weights``: shared affinity times per-ring scales),
as the refiner does: Triton multiplies the two inside its kernels, the shifted-slice path builds the
``[B, k*k-1, H, W]`` product first.

Timings are wall-clock between ``torch.cuda.synchronize()`` calls (``timing.timeit``). Without a GPU
(or without triton) it prints why and exits with status 0; ``measure_case`` runs on any device and
backends (the tests run it on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from importlib.util import find_spec
from typing import Any

import torch
from bench_propagation import (
    _call,
    _propagate_forward,
    _propagate_fwd_bwd,
    _step_fwd_bwd,
    _terms,
    first_step_weights,
    refiner_and_guidance,
    step_bytes,
)
from timing import timeit, timeit_interleaved

from spntune.models.propagation import num_rings, propagate_step, set_propagation_backend

SHAPES = ([4, 11, 192, 256], [8, 21, 512, 512])
CASES = (("cspn", 3), ("cspn", 7), ("dyspn", 7))


def measure_case(x: torch.Tensor, x0: torch.Tensor, name: str, k: int, iterations: int, repeats: int,
                 backends: tuple[str, ...] = ("torch", "triton")) -> dict[str, Any]:  # fmt: skip
    """One case on ``x``'s device, per backend (``set_propagation_backend``): one step's forward and
    forward+backward (every input requiring grad, ``bench_propagation._step_fwd_bwd``), and T steps through
    ``propagate`` forward and forward+backward with every step's weights formed from a guidance by the
    refiner's own ``step_weights``, as a trial runs them (``bench_propagation.refiner_and_guidance``); each
    backend's four timed interleaved. The last backend is the fast one: speed-ups are first / last, and its
    forward's bandwidth counts the minimum bytes of one step (``bench_propagation.step_bytes``)."""
    b, c, h, w = x.shape
    aff = torch.randn(b, k * k - 1, h, w, device=x.device)
    att = torch.rand(b, (num_rings(k) + 1) * iterations, h, w, device=x.device)  # DySPN: each step's attention
    weights = first_step_weights(name, k, aff, att)
    trial = refiner_and_guidance(name, k, aff, att, iterations, c)
    fns = {"forward": partial(_call, propagate_step, x, x0, weights, k),  # no input requires grad: no graph
           "step": partial(_step_fwd_bwd, propagate_step, x, x0, weights, k),
           "T_forward": partial(_propagate_forward, x0, *trial),
           "T_fwd_bwd": partial(_propagate_fwd_bwd, x0, *trial)}  # fmt: skip
    out: dict[str, Any] = {}
    for backend in backends:
        set_propagation_backend(backend)
        try:
            times = timeit_interleaved(fns, repeats)
        finally:
            set_propagation_backend(None)
        out[backend] = {f"{label}_ms": 1e3 * s for label, s in times.items()}
        out[backend]["step_fwd_bwd_over_fwd"] = times["step"] / times["forward"]
        out[backend]["T_fwd_bwd_over_fwd"] = times["T_fwd_bwd"] / times["T_forward"]
    slow, fast = out[backends[0]], out[backends[-1]]
    out["fwd_speedup"] = slow["forward_ms"] / fast["forward_ms"]
    out["train_speedup"] = slow["T_fwd_bwd_ms"] / fast["T_fwd_bwd_ms"]
    out["forward_bytes"] = step_bytes(tuple(x.shape), k, *_terms(weights))[0]
    out["fast_gbps"] = out["forward_bytes"] / (fast["forward_ms"] / 1e3) / 1e9
    return out


def measure(repeats: int = 20, iterations: int = 6) -> dict[str, Any] | None:
    """Per shape and case: ``measure_case`` on CUDA, torch vs triton, and the triton forward's bandwidth as
    a fraction of a 256 MiB ``clone`` (the practical HBM floor). None without CUDA or triton."""
    if not torch.cuda.is_available() or find_spec("triton") is None:
        return None
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "iterations": iterations, "shapes": {}}
    for shape in SHAPES:
        x = torch.randn(*shape, device=dev)
        x0 = torch.randn_like(x)
        big = torch.randn(64 * 2**20, device=dev)  # 256 MiB: beyond L2, a true HBM copy
        copy_s = timeit(big.clone, repeats)
        copy_bw = 2 * big.numel() * 4 / copy_s
        del big
        cases: dict[str, Any] = {}
        for name, k in CASES:
            m = measure_case(x, x0, name, k, iterations, max(3, repeats // 2))
            m["triton_of_clone"] = m["fast_gbps"] * 1e9 / copy_bw
            cases[f"{name}_{k}x{k}"] = m
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
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)
    _print_resources()
    r = measure(args.repeats, args.iterations)
    if r is None:
        print("bench_triton_gpu: no CUDA device or no triton here; nothing to measure.")
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    print(f"device {r['device']}, fp32, T={args.iterations}")
    header = (
        f"{'shape':>18} {'step':>9} | {'fwd torch':>9} {'fwd triton':>10} {'speed-up':>8} {'f+b/f':>6} | "
        f"{'T fwd+bwd torch':>15} {'triton':>8} {'speed-up':>8} {'f+b/f':>6} | {'GB/s':>6} {'of clone':>8}"
    )
    for shape, per in r["shapes"].items():
        print(f"\nshape {shape}: clone bandwidth {per['clone_gbps']:.0f} GB/s")
        print(header)
        for case, m in per["cases"].items():
            slow, fast = m["torch"], m["triton"]
            print(
                f"{shape:>18} {case:>9} | {slow['forward_ms']:7.2f}ms {fast['forward_ms']:8.2f}ms "
                f"{m['fwd_speedup']:7.1f}x {fast['step_fwd_bwd_over_fwd']:6.2f} | {slow['T_fwd_bwd_ms']:13.1f}ms "
                f"{fast['T_fwd_bwd_ms']:6.1f}ms {m['train_speedup']:7.1f}x {fast['T_fwd_bwd_over_fwd']:6.2f} | "
                f"{m['fast_gbps']:6.0f} {m['triton_of_clone']:8.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
