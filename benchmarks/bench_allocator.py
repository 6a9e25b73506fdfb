"""Training steps with glibc's malloc defaults vs the settings of ``spntune/allocator.py``.

Each setting runs in processes of its own (the settings are read at process start), alternating
``default, reuse, reuse, default, ...`` so that a slow spell of the machine hits both. A process builds
a trial's model (``trainables.build_model``: U-Net/ResNet-18 + the refiner), then trains on random
``[B, 3, H, W]`` batches in a thread, as Ray Tune runs a trial: AdamW, channels-last, cross-entropy on
the coarse and the refined logits. It reports each step's seconds, minor page faults and system time
per step, and its peak resident memory (``VmHWM``).

Prints, per setting, the median step and the faults per step, and the ratios default / reuse (step
time; > 1: the settings are faster) and reuse / default (peak memory). ``--quick`` shrinks everything
(a check that it runs, not numbers to quote).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from spntune import allocator


def child(kind: str, k: int, shape: list[int], classes: int, warm: int, steps: int) -> dict[str, Any]:
    """Runs in the measured process: the training steps, in a thread."""
    import resource
    import threading
    import time

    import torch

    from spntune.config import TrialConfig
    from spntune.trainables import build_model

    refiner = {"kind": kind, "kernel_size": k, "iterations": 6} if kind != "none" else {"kind": "none"}
    cfg = TrialConfig.from_dict({"model.arch": "unet", "model.encoder": "resnet18", "model.encoder_weights": None,
                                 **{f"refiner.{key}": v for key, v in refiner.items()}})  # fmt: skip
    b, c, h, w = shape
    torch.manual_seed(0)
    model = build_model(cfg, classes).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(b, c, h, w).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (b, h, w))
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    out: dict[str, Any] = {}

    def step() -> None:
        pred = model(x)
        loss = loss_fn(pred.coarse_logits, y) + loss_fn(pred.refined_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def train() -> None:
        for _ in range(warm):
            step()
        times = []
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out.update(step_s=times, faults_per_step=(r1.ru_minflt - r0.ru_minflt) / steps,
                   sys_s_per_step=(r1.ru_stime - r0.ru_stime) / steps, peak_rss_mb=_peak_rss_mb())  # fmt: skip

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``: Linux carries that over from
    the parent through fork and exec, so under ``make bench`` (a parent of several GB) every child
    would report the parent's peak."""
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _run_child(setting: str, args: list[str]) -> dict[str, Any]:
    env = allocator.defaults_env()
    if setting == "reuse":
        env |= allocator.settings_env()
    else:
        env[allocator.ENV_VAR] = "0"
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bench_allocator child ({setting}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(kind: str = "dyspn", k: int = 7, shape: tuple[int, int, int, int] = (8, 3, 192, 256), classes: int = 11,
            warm: int = 2, steps: int = 5, rounds: int = 2) -> dict[str, Any] | None:  # fmt: skip
    """Per setting, every process's results; the medians and ratios over all its steps. None off glibc
    (the settings do nothing there)."""
    if not allocator.is_glibc():
        return None
    args = [kind, str(k), *map(str, shape), str(classes), str(warm), str(steps)]
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "reuse": []}
    for i in range(rounds):
        for setting in ("default", "reuse") if i % 2 == 0 else ("reuse", "default"):
            runs[setting].append(_run_child(setting, args))
    summary: dict[str, Any] = {"case": f"{kind} {k}x{k}" if kind != "none" else "no refiner", "shape": list(shape),
                               "runs": runs}  # fmt: skip
    for setting, rs in runs.items():
        summary[setting] = {
            "median_step_s": statistics.median(t for r in rs for t in r["step_s"]),
            "faults_per_step": statistics.mean(r["faults_per_step"] for r in rs),
            "sys_s_per_step": statistics.mean(r["sys_s_per_step"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }
    summary["step_default_over_reuse"] = summary["default"]["median_step_s"] / summary["reuse"]["median_step_s"]
    summary["peak_rss_reuse_over_default"] = summary["reuse"]["peak_rss_mb"] / summary["default"]["peak_rss_mb"]
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, k, b, c, h, w, classes, warm, steps = argv[1:]
        print(json.dumps(child(kind, int(k), [int(b), int(c), int(h), int(w)], int(classes), int(warm), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refiner", default="dyspn", choices=["none", "cspn", "dyspn"])
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 3, 192, 256], metavar=("B", "C", "H", "W"))
    parser.add_argument("--rounds", type=int, default=2, help="pairs of processes, the order swapped each round")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    shape = (2, 3, 32, 48) if args.quick else tuple(args.shape)
    r = measure(args.refiner, args.kernel_size, shape, warm=1 if args.quick else 2, steps=2 if args.quick else 5,
                rounds=1 if args.quick else args.rounds)  # fmt: skip
    if r is None:
        print("skipped: not glibc's malloc")
        return
    for setting in ("default", "reuse"):
        s = r[setting]
        print(f"{r['case']} {r['shape']} {setting:>7}: median step {s['median_step_s']:.3f} s, "
              f"{s['faults_per_step']:.0f} page faults and {s['sys_s_per_step']:.3f} s system time per step, "
              f"peak {s['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(
        f"step time default / reuse {r['step_default_over_reuse']:.2f}; "
        f"peak memory reuse / default {r['peak_rss_reuse_over_default']:.2f}"
    )


if __name__ == "__main__":
    main()
