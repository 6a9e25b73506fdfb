"""The fused Triton kernels checked on a real GPU, before ``bench_triton_gpu`` times them.

The default suite checks the Triton kernels on the CPU under Triton's interpreter; what only a GPU shows
(code generation for the device, ``atomic_add`` on the border, launch grids over real sizes) is checked
here: one step's output and every input's gradient against the unfold reference
(``propagate_step_reference``), and T steps through ``propagate`` (one autograd node) against the same
steps one by one on the reference, for CSPN 3x3 / 7x7 (anchor ``h0`` and ``ht``) and DySPN 7x7 (factored
weights), float64 and float32, on shapes with partial tiles and more channels than one channel block.

Prints one line per check and a summary; ``--json`` writes every error. Exit status 1 where a check
fails, 0 where all pass or where there is no CUDA device or no triton (nothing to check).
``benchmarks/gpu_check.sh`` runs it, then the benchmark, as one command for a session lent a GPU.
``run_checks`` runs on any device and backend (the tests run it on the CPU's C++ kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.util import find_spec
from typing import Any

import torch

from spntune.models.propagation import (
    cspn_weights,
    dyspn_factored_weights,
    num_rings,
    propagate,
    propagate_step,
    propagate_step_reference,
    set_propagation_backend,
)

# (variant, kernel size, [B, C, H, W]): 8x32-pixel tiles left partial, 11 channels (two channel blocks of 8)
CASES = (
    ("cspn-h0", 3, (2, 11, 13, 45)),
    ("cspn-ht", 3, (1, 3, 8, 32)),
    ("cspn-h0", 7, (2, 11, 13, 45)),
    ("dyspn-factored", 7, (2, 11, 13, 45)),
    ("dyspn-factored", 7, (1, 5, 40, 70)),
)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}  # max |got - want| / max(1, max |want|)


def _weights(variant: str, k: int, aff: torch.Tensor, att: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    if variant == "dyspn-factored":  # what the DySPN refiner passes: affinity, self, anchor, ring scale
        return dyspn_factored_weights(aff, att, k)
    return cspn_weights(aff, variant.split("-")[1])


def _leaves(k: int, shape: tuple[int, int, int, int], dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    made = [torch.randn(b, c, h, w, generator=g, dtype=dtype), torch.randn(b, c, h, w, generator=g, dtype=dtype),
            torch.randn(b, k * k - 1, h, w, generator=g, dtype=dtype),
            torch.rand(b, num_rings(k) + 1, h, w, generator=g, dtype=dtype)]  # fmt: skip
    return [t.to(device).requires_grad_() for t in made]


def _relative(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def check_step(device: str, backend: str, variant: str, k: int, shape: tuple[int, int, int, int],
               dtype: torch.dtype) -> dict[str, float]:  # fmt: skip
    """One step on ``backend`` (``set_propagation_backend``) against the unfold reference: the relative error
    (``_relative``) of the output and of the gradients of ``h``, ``h0``, the affinity and the attention."""
    h, h0, aff, att = leaves = _leaves(k, shape, dtype, device)
    w = _weights(variant, k, aff, att)
    set_propagation_backend(backend)
    try:
        out = propagate_step(h, h0, *w[:3], k, *w[3:])
    finally:
        set_propagation_backend(None)
    ref = propagate_step_reference(h, h0, *w[:3], k, *w[3:])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    got = torch.autograd.grad(out, leaves, g, allow_unused=True, retain_graph=True)  # the weights' graph is shared
    want = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    errors = {"output": _relative(out.detach(), ref.detach())}
    errors.update({f"grad_{n}": _relative(a, b) for n, a, b in zip(("h", "h0", "aff", "att"), got, want)})
    return errors


def check_steps(device: str, backend: str, variant: str, k: int, shape: tuple[int, int, int, int],
                dtype: torch.dtype, iterations: int = 3) -> dict[str, float]:  # fmt: skip
    """``iterations`` steps through ``propagate`` on ``backend`` (one autograd node where it fuses them) against
    the same steps one by one on the reference, with a loss on an intermediate step as well as the last."""
    _, *leaves = _leaves(k, shape, dtype, device)  # h0, the affinity and the attention (h^0 is h0)
    h0, aff, att = leaves
    if variant == "dyspn-factored":  # one affinity for every step, each step its own attention (the refiner's)
        steps = [_weights(variant, k, aff, att * s) for s in (1.0, 0.5, 0.25, 0.125, 0.0625)[:iterations]]
    else:  # CSPN: one set of weights for every step
        steps = [_weights(variant, k, aff, att)] * iterations
    set_propagation_backend(backend)
    try:
        out, hs = propagate(h0, steps, k, return_steps=True)
    finally:
        set_propagation_backend(None)
    ref, h = [], h0
    for w in steps:
        h = propagate_step_reference(h, h0, *w[:3], k, *w[3:])
        ref.append(h)
    gen = torch.Generator().manual_seed(2)
    g_last, g_mid = (torch.randn(out.shape, generator=gen, dtype=dtype).to(device) for _ in range(2))
    mid = min(1, iterations - 1)
    got = torch.autograd.grad((out * g_last).sum() + (hs[1 + mid] * g_mid).sum(), leaves, allow_unused=True,
                              retain_graph=True)  # fmt: skip
    want = torch.autograd.grad((ref[-1] * g_last).sum() + (ref[mid] * g_mid).sum(), leaves, allow_unused=True)
    errors = {"output": _relative(out.detach(), ref[-1].detach())}
    errors.update({f"grad_{n}": _relative(a, b) for n, a, b in zip(("h0", "aff", "att"), got, want)})
    return errors


def run_checks(device: str, backend: str, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
               cases: tuple[tuple[str, int, tuple[int, int, int, int]], ...] = CASES) -> list[dict[str, Any]]:  # fmt: skip
    """Every case's one-step and T-step checks in every dtype on ``device`` and ``backend``: one record each,
    with its errors, the tolerance and whether every error is within it."""
    records = []
    for dtype in dtypes:
        for variant, k, shape in cases:
            for kind, check in (("step", check_step), ("T=3", check_steps)):
                errors = check(device, backend, variant, k, shape, dtype)
                tol = TOLERANCE[dtype]
                records.append({"check": kind, "variant": variant, "k": k, "shape": list(shape),
                                "dtype": str(dtype).removeprefix("torch."), "errors": errors, "tolerance": tol,
                                "ok": all(e <= tol for e in errors.values())})  # fmt: skip
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write every record here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or find_spec("triton") is None:
        print("check_triton_gpu: no CUDA device or no triton here; nothing checked.")
        return 0
    print(f"check_triton_gpu on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    records = run_checks("cuda", "triton")
    for r in records:
        worst = max(r["errors"], key=r["errors"].get)
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:>4} {r['variant']:>14} {r['k']}x{r['k']} "
              f"{r['shape']!s:>18} {r['dtype']:>7}: worst {worst} {r['errors'][worst]:.2e} (tolerance "
              f"{r['tolerance']:.0e})")  # fmt: skip
    failed = sum(not r["ok"] for r in records)
    print(f"check_triton_gpu: {len(records) - failed} of {len(records)} checks passed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
