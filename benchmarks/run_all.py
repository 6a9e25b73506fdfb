"""``make bench``: every benchmark in one run, one table of ratios, the same numbers in ``runs/bench/bench.json``.

Runs, in this process and one after the other (never alongside a test suite: the ratios are only
meaningful on a machine doing nothing else):

- ``bench_propagation``: propagation step on ``[4, 11, 192, 256]`` (CPU, or CUDA where there is one) with the
  backend ``propagate_step`` picks (the fused C++ kernels on CPU): speed-ups over the shifted-slice path and
  unfold, allocation ratio, forward+backward / forward, forward as a fraction of the map's ``clone``
  bandwidth and of the same-bytes ``copy_`` floor, T steps vs shifted slices and autograd through the loop;
  on the CPU also T steps at ``[8, 21, 256, 256]`` (44 MB maps) with and without the buffer pool;
- ``bench_triton_gpu``: the fused Triton kernels vs the shifted-slice path on CUDA (skipped without one);
- ``bench_loader``: training images/s from the image cache vs from the files;
- ``bench_coarse_cache``: wall time of a refinement-only search (8 two-stage trials) with / without the
  coarse cache;
- ``bench_allocator``: training steps (U-Net/ResNet-18 + DySPN 7x7, CamVid size) with glibc's malloc
  defaults vs ``spntune/allocator.py``'s settings, in processes of their own, alternating;
- ``bench_repeats``: the share of a refinement-only search's trials that TPE spends on configurations it
  already ran, alone and behind ``DistinctSearcher`` (no training: the sampler's proposals only).

The process runs with ``spntune/allocator.py``'s malloc settings, as trials and ``spntune train`` do
(``timing.malloc_settings``; ``bench_allocator`` compares both in child processes of their own). Every ratio is
measured in this run; targets are the issue's. ``--quick`` shrinks every benchmark (a
check that they run, not numbers to quote); ``--skip NAME`` leaves one out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_allocator
import bench_coarse_cache
import bench_loader
import bench_propagation
import bench_repeats
import bench_triton_gpu
from timing import malloc_settings

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("propagation", "triton_gpu", "loader", "coarse_cache", "allocator", "repeats")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    from spntune.models.cpu_propagation import usable_cpus

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu} x{usable_cpus()} CPUs, {_caches()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")  # fmt: skip


def _caches() -> str:
    """The last-level cache as sysfs gives it and as the CPU kernels count it (at most 16 MB per usable CPU:
    a VM's sysfs can show the whole host socket's L3)."""
    from spntune.models import cpu_propagation

    sysfs = cpu_propagation.last_level_cache_bytes()
    shown = f"{sysfs >> 20} MB" if sysfs else "unknown"
    return f"last-level cache {shown} in sysfs, {cpu_propagation.cache_bytes() >> 20} MB for the kernels"


def rows_of(name: str, r: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """``(benchmark, measure, value, target)`` rows of one benchmark's results."""
    rows: list[tuple[str, str, float, str]] = []
    if name == "propagation":
        for case, m in r["cases"].items():
            t = m["T_fwd_bwd_ms"]
            picked = r["backend"]
            rows += [
                (name, f"{case} forward speed-up {picked} / shifted slices", m["speedup_over_shifted_slice"], ""),
                (
                    name,
                    f"{case} fwd+bwd speed-up {picked} / shifted slices",
                    m["fwd_bwd_speedup_over_shifted_slice"],
                    "",
                ),
                (name, f"{case} forward speed-up {picked} / unfold", m["speedup_over_unfold"], ""),
                (name, f"{case} largest allocation unfold / {picked}", m["alloc_unfold_over_fast"], ""),
                (name, f"{case} step forward+backward / forward", m["fwd_bwd_over_fwd"], "<= 3"),
                *(
                    [(name, f"{case} same, the kernels alone (buffers preallocated)", m["kernel_fwd_bwd_over_fwd"], "")]
                    if m["kernel_fwd_bwd_over_fwd"] is not None
                    else []
                ),
                *(
                    [
                        (
                            name,
                            f"{case} same, at the streaming floor (maps read and written row by row, no arithmetic)",
                            m["streaming_floor_fwd_bwd_over_fwd"],
                            "",
                        ),
                        (
                            name,
                            f"{case} kernels' forward, fraction of its streaming floor",
                            m["kernel_forward_of_streaming_floor"],
                            "",
                        ),
                        (
                            name,
                            f"{case} kernels' backward, fraction of its streaming floor",
                            m["kernel_backward_of_streaming_floor"],
                            "",
                        ),
                    ]
                    if "streaming_floor_fwd_bwd_over_fwd" in m
                    else []
                ),
                (
                    name,
                    f"{case} same, each call from a cold cache (1 GiB written before)",
                    m["cold_fwd_bwd_over_fwd"],
                    "",
                ),
                (
                    name,
                    f"{case} same, T={r['iterations']} steps through propagate",
                    m["T_propagate_fwd_bwd_over_fwd"],
                    "",
                ),
                (
                    name,
                    f"{case} forward, fraction of the map's clone bandwidth",
                    m["forward_of_clone_bandwidth"],
                    ">= 0.5",
                ),
                (name, f"{case} forward, fraction of the same-bytes copy floor", m["forward_of_copy_floor"], ""),
                (
                    name,
                    f"{case} forward, fraction of its compute floor (matmul FMA rate)",
                    m["forward_of_compute_floor"],
                    "",
                ),
                (name, f"{case} the target's forward time / compute floor", m["target_over_compute_floor"], ""),
                (
                    name,
                    f"{case} the target's forward time / memory floor (256 MiB copy bandwidth)",
                    m["target_over_memory_floor"],
                    "",
                ),
                (
                    name,
                    f"{case} forward of one batch item, fraction of matmul FMA rate",
                    m["one_item_forward_of_matmul_fma_rate"],
                    "",
                ),
                (
                    name,
                    f"{case} step forward+backward / forward in multiply-adds",
                    m["fwd_bwd_over_fwd_in_multiply_adds"],
                    "",
                ),
                (
                    name,
                    f"{case} step forward+backward / forward in minimum bytes",
                    m["fwd_bwd_over_fwd_in_bytes"],
                    "",
                ),
                (
                    name,
                    f"{case} forward, fraction of a 256 MiB copy's bandwidth (memory)",
                    m["forward_of_memory_copy_bandwidth"],
                    "",
                ),
                (
                    name,
                    f"{case} T={r['iterations']} fwd+bwd: shifted slices / {picked}",
                    t["shifted slice"] / t["picked"],
                    "",
                ),
                (
                    name,
                    f"{case} T={r['iterations']} fwd+bwd: autograd loop / {picked}",
                    t["autograd through loop"] / t["picked"],
                    "",
                ),
                (
                    name,
                    f"{case} T={r['iterations']} fwd+bwd: {picked} step by step / propagate (one node)",
                    t["picked"] / t["propagate"],
                    "",
                ),
            ]
        for case, p in r.get("pool", {}).items():
            rows.append((name, f"{case} T={r['iterations']} fwd+bwd at {r['pool_shape']}: no buffer pool / pool",
                         p["no_pool_ms"] / p["pool_ms"], ""))  # fmt: skip
            rows.append((name, f"{case} step forward+backward / forward at {r['pool_shape']}",
                         p["step_fwd_bwd_ms"] / p["step_forward_ms"], "<= 3"))  # fmt: skip
            rows.append((name, f"{case} forward, fraction of the map's clone bandwidth at {r['pool_shape']}",
                         p["forward_of_clone_bandwidth"], ">= 0.5"))  # fmt: skip
    elif name == "triton_gpu":
        for shape, per in r["shapes"].items():
            for case, m in per["cases"].items():
                rows += [
                    (name, f"{shape} {case} forward speed-up triton / torch", m["fwd_speedup"], ""),
                    (name, f"{shape} {case} T fwd+bwd speed-up triton / torch", m["train_speedup"], ""),
                    (
                        name,
                        f"{shape} {case} triton step forward+backward / forward",
                        m["triton"]["step_fwd_bwd_over_fwd"],
                        "",
                    ),
                    (
                        name,
                        f"{shape} {case} triton T={r['iterations']} propagate forward+backward / forward",
                        m["triton"]["T_fwd_bwd_over_fwd"],
                        "",
                    ),
                    (name, f"{shape} {case} triton forward, fraction of clone bandwidth", m["triton_of_clone"], ""),
                ]
    elif name == "loader":
        rows.append((name, f"{r['shape']}: img/s image cache / files", r["cache_speedup"], ""))
        if "cache_workers_speedup" in r:
            rows.append((name, f"{r['shape']}: img/s cache + workers / files", r["cache_workers_speedup"], ""))
    elif name == "coarse_cache":
        rows += [
            (name, f"{r['trials']} two-stage trials: wall time with / without cache", r["ratio"], "<= 0.5"),
            (name, "same: CPU time with / without cache", r["cpu_ratio"], ""),
            (name, "final scores identical with and without (1 = yes)", float(r["final_scores_identical"]), "1"),
        ]
    elif name == "allocator":
        case = f"{r['case']} training step {r['shape']}"
        rows += [
            (name, f"{case}: time glibc defaults / reuse", r["step_default_over_reuse"], ""),
            (name, f"{case}: page faults per step, glibc defaults", r["default"]["faults_per_step"], ""),
            (name, f"{case}: page faults per step, reuse", r["reuse"]["faults_per_step"], ""),
            (name, f"{case}: peak memory reuse / glibc defaults", r["peak_rss_reuse_over_default"], ""),
        ]
    elif name == "repeats":
        case = f"{r['trials']} trials on {r['configurations']} configurations ({r['seeds']} seeds)"
        rows += [
            (name, f"{case}: share repeating a configuration, TPE alone", r["repeat_share_tpe"], ""),
            (name, f"{case}: share repeating a configuration, DistinctSearcher", r["repeat_share_distinct"], "0"),
            (name, f"{case}: distinct configurations trained, DistinctSearcher / TPE alone",
             r["distinct_distinct"] / r["distinct_tpe"], ""),
        ]  # fmt: skip
    return rows


def run(names: list[str], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        if name == "propagation":
            shape = (1, 4, 32, 48) if quick else (4, 11, 192, 256)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            pool_shape = (1, 4, 32, 48) if quick else (8, 21, 256, 256)
            results[name] = bench_propagation.measure(shape, 2 if quick else 5, 2 if quick else 6, device, pool_shape,
                                                       64 << 20 if quick else 1 << 30)  # fmt: skip
        elif name == "triton_gpu":
            results[name] = bench_triton_gpu.measure(3 if quick else 20)
        elif name == "loader":
            results[name] = bench_loader.measure(epochs=1 if quick else 3, limit=16 if quick else None)
        elif name == "coarse_cache":
            small = ["--limit-train", "8", "--limit-val", "4", "--coarse-epochs", "1", "--trials", "2",
                     "--image-size", "32", "64"] if quick else ["--limit-train", "48", "--limit-val", "16"]  # fmt: skip
            results[name] = bench_coarse_cache.measure(bench_coarse_cache.parse_args(small))
        elif name == "allocator":
            results[name] = (bench_allocator.measure(shape=(2, 3, 32, 48), warm=1, steps=2, rounds=1) if quick
                             else bench_allocator.measure())  # fmt: skip
        elif name == "repeats":
            results[name] = bench_repeats.measure(8 if quick else 24, 1 if quick else 5)
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that every benchmark runs")
    p.add_argument("--skip", nargs="*", choices=BENCHMARKS, default=[])
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "bench.json")
    args = p.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    malloc = malloc_settings()
    start = time.perf_counter()
    results = run([n for n in BENCHMARKS if n not in args.skip], args.quick)
    rows = [row for name, r in results.items() if r is not None for row in rows_of(name, r)]
    skipped = [name for name, r in results.items() if r is None]
    print(f"\nmake bench on {machine()}, malloc: {malloc}{' (--quick: not numbers to quote)' if args.quick else ''}")
    width = max(len(m) for _, m, _, _ in rows) if rows else 10
    print(f"{'benchmark':<13} {'measure':<{width}} {'value':>8}  target")
    for bench, measure, value, target in rows:
        print(f"{bench:<13} {measure:<{width}} {value:8.2f}  {target}")
    for name in skipped:
        why = "glibc's malloc only" if name == "allocator" else "no CUDA device (or no triton) on this machine"
        print(f"{name:<13} skipped: {why}")
    print(f"total {time.perf_counter() - start:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    table = [{"benchmark": b, "measure": m, "value": v, "target": t} for b, m, v, t in rows]
    args.json.write_text(json.dumps({"machine": machine(), "malloc": malloc, "quick": args.quick, "table": table,
                                     "skipped": skipped, "results": results}, indent=1, default=str))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
