"""Loader speed: training images/s from files (decode + augment every epoch) vs from the image cache.

On ``../shared/data/camvid-mini`` (train split, 367 JPEG/PNG pairs) at the training size, one epoch of
the training DataLoader exactly as a trial builds it (``build_datasets`` + ``trainables._loader``), for:

- ``files``: no cache, ``data.num_workers`` 0 (the old default);
- ``cache``: the decoded-image cache, warm (built once beforehand; its build time is printed too);
- ``cache+workers``: the cache with ``--workers`` DataLoader workers (what ``num_workers: auto`` gives
  on a bigger machine), when this machine has the CPUs for it.

Prints images/s and the speed-up over ``files``, measured in this run, and returns them as a dict
(``benchmarks/run_all.py`` collects it into ``runs/bench/bench.json``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spntune.config import DataConfig
from spntune.data import build_datasets
from spntune.trainables import _loader

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid-mini"


def images_per_second(cfg: DataConfig, workers: int, epochs: int, batch_size: int = 8) -> float:
    train, _, _ = build_datasets(cfg, 0, cache=True)
    loader = _loader(train, batch_size, True, workers, 0)
    seen, best = 0, 0.0
    for _ in range(epochs):  # the best epoch: the machine is shared, other jobs only ever slow it down
        t0 = time.perf_counter()
        seen = sum(image.shape[0] for image, _ in loader)
        best = max(best, seen / (time.perf_counter() - t0))
    return best


def measure(data_root: Path = CAMVID, size: tuple[int, int] = (96, 128), epochs: int = 3,
            workers: int = 2, limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Images/s per setting and speed-ups over reading the files."""
    with tempfile.TemporaryDirectory(prefix="spntune-bench-loader-") as tmp:
        files = DataConfig(name="folder", root=str(data_root), image_size=size, cache=False, limit_train=limit)
        cached = files.model_copy(update={"cache": True, "cache_dir": tmp})
        t0 = time.perf_counter()
        build_datasets(cached, 0, cache=True)  # the one-time decode
        build_seconds = time.perf_counter() - t0
        out: dict[str, Any] = {
            "shape": f"camvid-mini train{f' (first {limit})' if limit else ''} {size[0]}x{size[1]}",
            "cache_build_s": build_seconds,
        }
        out["files_img_s"] = images_per_second(files, 0, epochs)
        out["cache_img_s"] = images_per_second(cached, 0, epochs)
        out["cache_speedup"] = out["cache_img_s"] / out["files_img_s"]
        if workers and len(os.sched_getaffinity(0)) > workers:
            out["cache_workers_img_s"] = images_per_second(cached, workers, epochs)
            out["cache_workers_speedup"] = out["cache_workers_img_s"] / out["files_img_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=CAMVID)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    r = measure(args.data_root, epochs=args.epochs, workers=args.workers)
    print(
        f"loader ({r['shape']}, batch 8, best of {args.epochs} epochs; cache built once in {r['cache_build_s']:.1f} s)"
    )
    print(f"  files (decode + augment), 0 workers : {r['files_img_s']:7.0f} img/s")
    print(f"  image cache, 0 workers              : {r['cache_img_s']:7.0f} img/s   x{r['cache_speedup']:.2f}")
    if "cache_workers_img_s" in r:
        print(f"  image cache, {args.workers} workers              : {r['cache_workers_img_s']:7.0f} img/s   "
              f"x{r['cache_workers_speedup']:.2f}")  # fmt: skip
    else:
        print(f"  image cache, {args.workers} workers: skipped (this machine has {len(os.sched_getaffinity(0))} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
