"""Coarse cache: wall time of a refinement-only search with and without it (issue 11's target: <= 0.5x).

The same 8 two-stage trials (coarse network fixed; refiner kind, kernel, iterations and affinity network
vary) run in-process one after another through ``train_segmentation`` (no Ray), each once with
``train.coarse_cache: false`` and once with a fresh cache folder (interleaved): with the cache the first
trial trains the coarse network and stores it, the other seven replay its epochs and train only their
refiners. Prints both wall times (sums of the trials'), their ratio, and checks that every trial's
final scores are the same either way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from spntune.reporting import EpochReport, Reporter
from spntune.trainables import train_segmentation

ROOT = Path(__file__).resolve().parents[1]

#: (kind, kernel, iterations, affinity network): what a refinement-only search varies.
REFINERS = [
    ("cspn", 3, 6, "light"), ("cspn", 5, 4, "shared"), ("cspn", 3, 2, "unet"), ("cspn", 7, 8, "light"),
    ("dyspn", 7, 6, "light"), ("dyspn", 5, 4, "shared"), ("dyspn", 3, 6, "unet"), ("dyspn", 7, 3, "shared"),
]  # fmt: skip


class _Rows(Reporter):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def report(self, epoch: EpochReport) -> None:
        self.rows.append(dict(epoch.metrics))


def trial_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {
        "data.name": "folder", "data.root": str(args.data_root), "data.image_size": list(args.image_size),
        "data.limit_train": args.limit_train, "data.limit_val": args.limit_val, "model.arch": "unet",
        "model.encoder": "resnet18", "model.encoder_weights": None, "train.stage": "two_stage",
        "train.coarse_epochs": args.coarse_epochs, "train.refine_epochs": args.refine_epochs,
        "train.batch_size": 8, "train.device": "cpu", "train.viz_samples": 0,
    }  # fmt: skip
    return [{**base, "refiner.kind": kind, "refiner.kernel_size": k, "refiner.iterations": t,
             "refiner.affinity_net": net, "refiner.channels": 16} for kind, k, t, net in REFINERS[: args.trials]]  # fmt: skip


def run_trial(cfg: dict[str, Any], cache_dir: str | None) -> dict[str, Any]:
    """One trial, with the cache in ``cache_dir`` or without one; its seconds and final scores."""
    rows = _Rows()
    cache = {"train.coarse_cache": True, "train.coarse_cache_dir": cache_dir} if cache_dir else {
        "train.coarse_cache": False}  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    train_segmentation({**cfg, **cache}, rows)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "cached_epochs": sum(int(r.get("coarse_cached", 0)) for r in rows.rows),
            **{k: v for k, v in rows.rows[-1].items() if k.startswith("final_")}}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "camvid-mini")
    parser.add_argument("--image-size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    parser.add_argument("--limit-train", type=int, default=96)
    parser.add_argument("--limit-val", type=int, default=32)
    parser.add_argument("--coarse-epochs", type=int, default=3)
    parser.add_argument("--refine-epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=8, choices=range(2, len(REFINERS) + 1))
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "coarse_cache.json")
    args = parser.parse_args(argv)
    if not (args.data_root / "classes.txt").is_file():
        parser.error(f"--data-root {args.data_root}: no camvid-mini there (classes.txt missing)")
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The trials without and with the cache (interleaved); prints a line per pair; the summary dict."""
    configs = trial_configs(args)
    print(f"{len(configs)} two-stage trials, CamVid {args.image_size[0]}x{args.image_size[1]}, "
          f"{args.limit_train}/{args.limit_val} images, coarse {args.coarse_epochs} + refine {args.refine_epochs} "
          "epochs, in-process, sequential", flush=True)  # fmt: skip
    # Interleaved (trial i without, then with the cache) so that a change in the machine's load during
    # the run (it is shared) falls on both sides alike.
    plain_results, cached_results = [], []
    with tempfile.TemporaryDirectory(prefix="spntune-coarse-cache-") as tmp:
        for cfg in configs:
            plain_results.append(run_trial(cfg, None))
            cached_results.append(run_trial(cfg, tmp))
            print(f"  {cfg['refiner.kind']} k{cfg['refiner.kernel_size']} T{cfg['refiner.iterations']} "
                  f"{cfg['refiner.affinity_net']:<6}: {plain_results[-1]['seconds']:6.1f} s without, "
                  f"{cached_results[-1]['seconds']:6.1f} s with the cache "
                  f"({cached_results[-1]['cached_epochs']} coarse epochs replayed)", flush=True)  # fmt: skip
    plain = sum(r["seconds"] for r in plain_results)
    cached = sum(r["seconds"] for r in cached_results)
    # CPU seconds of this process: the work done, less sensitive than wall time to other jobs' load
    cpu_ratio = sum(r["cpu_seconds"] for r in cached_results) / sum(r["cpu_seconds"] for r in plain_results)
    same = all(
        a.get("final_refined_miou") == b.get("final_refined_miou")
        and a.get("final_refined_boundary_iou") == b.get("final_refined_boundary_iou")
        for a, b in zip(plain_results, cached_results, strict=True)
    )
    ratio = cached / plain
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "trials": len(configs),
            "seconds_no_cache": plain, "seconds_cache": cached, "ratio": ratio, "cpu_ratio": cpu_ratio,
            "final_scores_identical": same, "replayed_epochs": sum(r["cached_epochs"] for r in cached_results),
            "no_cache": plain_results, "cache": cached_results}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = measure(args)
    plain, cached, n = r["seconds_no_cache"], r["seconds_cache"], r["trials"]
    ratio, cpu_ratio, same = r["ratio"], r["cpu_ratio"], r["final_scores_identical"]
    print(f"without cache: {plain:7.1f} s ({plain / n:.1f} s/trial)")
    print(f"with cache:    {cached:7.1f} s ({cached / n:.1f} s/trial); coarse network trained once, "
          f"{r['replayed_epochs']} coarse epochs replayed")  # fmt: skip
    print(f"wall-time ratio cache / no cache: {ratio:.2f} (target <= 0.5); CPU-time ratio {cpu_ratio:.2f}; "
          f"final scores identical: {same}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
