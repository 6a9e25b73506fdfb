"""Overhead Ray Tune adds per trial: the same N trials in a plain loop vs through `spntune search`.

All run sequentially (concurrency 1) on identical configs (a space whose every parameter has one
value). "ray" is Ray alone (start-up, actor per trial, a full checkpoint with optimiser state persisted
every epoch); "ray+mlflow" adds MLflow tracking (params, metrics, best checkpoint artifact).
Prints ratios measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from spntune.space import SearchSpace
from spntune.trainables import train_segmentation
from spntune.tune import SearchOptions, run_search

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
    timings = {}
    for label, uri in (("ray", "none"), ("ray+mlflow", None)):
        with tempfile.TemporaryDirectory() as tmp:
            if uri is None:
                uri = f"sqlite:///{tmp}/mlflow.db"
            opts = SearchOptions(space=space, trials=args.trials, concurrency=1, scheduler="none",
                                 storage=Path(tmp) / "ray", name="overhead", tracking_uri=uri)  # fmt: skip
            t0 = time.perf_counter()
            summary = run_search(opts)
            timings[label] = time.perf_counter() - t0
        assert len(summary.rows) == args.trials and all(r.status == "completed" for r in summary.rows)
    print(
        f"trials: {args.trials} x ({BASE['train.epochs']} epochs, {BASE['data.train_size']} synthetic 64x64 images), concurrency 1"
    )
    print(f"in-process loop:        {loop:6.1f} s ({loop / args.trials:.2f} s/trial)")
    for label, total in timings.items():
        print(f"{label + ' search:':<23} {total:6.1f} s ({total / args.trials:.2f} s/trial, Ray start-up included); "
              f"overhead {(total - loop) / args.trials:.2f} s/trial; ratio to loop {total / loop:.2f}")  # fmt: skip
    print(
        f"throughput: {3600 * args.trials / timings['ray+mlflow']:.0f} trials/hour with Ray + MLflow at concurrency 1"
    )


if __name__ == "__main__":
    main()
