"""Overhead Ray Tune adds per trial: the same N trials in a plain loop vs through `spntune search`.

Both run sequentially (concurrency 1) on identical configs (a space whose every parameter has one
value), so the difference is Ray's: start-up, actor creation, result/checkpoint persistence.
Prints one ratio measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from spntune.search import SearchOptions, run_search
from spntune.space import SearchSpace
from spntune.trainables import train_segmentation

BASE = {
    "data.image_size": [64, 64], "data.train_size": 32, "data.val_size": 16, "train.epochs": 2,
    "train.batch_size": 8, "train.viz_samples": 0, "refiner.kind": "cspn", "refiner.channels": 8,
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    for _ in range(args.trials):
        train_segmentation(dict(BASE))
    loop = time.perf_counter() - t0

    space = SearchSpace(name="overhead", base=BASE, params={"train.seed": {"choice": [0]}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_search(
            SearchOptions(
                space=space, trials=args.trials, concurrency=1, scheduler="none", storage=Path(tmp), name="overhead"
            )
        )
        ray_total = time.perf_counter() - t0
    assert len(summary.rows) == args.trials and all(r.status == "completed" for r in summary.rows)
    print(f"trials: {args.trials} x ({BASE['train.epochs']} epochs, {BASE['data.train_size']} synthetic 64x64 images)")
    print(f"in-process loop: {loop:.1f} s ({loop / args.trials:.2f} s/trial)")
    print(f"ray tune search: {ray_total:.1f} s ({ray_total / args.trials:.2f} s/trial, Ray start-up included)")
    print(f"overhead per trial: {(ray_total - loop) / args.trials:.2f} s; ratio ray/loop = {ray_total / loop:.2f}")
    print(f"throughput: {3600 * args.trials / ray_total:.0f} trials/hour through Ray at concurrency 1")


if __name__ == "__main__":
    main()
