"""Does refinement earn its cost? Coarse -> refined mIoU and boundary IoU at original resolution on CamVid.

Rows (issue 10, part 3), every one a real trial (``train_segmentation``, in-process, no Ray):

- **two-stage**: the coarse network trained ``--coarse-epochs`` and frozen (``coarse only``), then each
  refiner (none / cspn / dyspn) x affinity network (light / unet / shared) trained ``--refine-epochs``
  on top of it. The coarse cache (``train.coarse_cache``) trains that coarse network once for all rows.
- **joint**: coarse network and refiner trained together for ``--joint-epochs``.
- **equal-compute baseline**: the same coarse network trained alone for coarse + refine epochs, so a
  refiner has to beat simply training longer.

Scores are each trial's ``final_*`` metrics: the best epoch's weights on the validation images at their
original size (logits upsampled bilinearly, then argmax), as ``spntune evaluate`` reports them. "coarse"
is the trial's own coarse stream (the frozen network for two-stage rows). s/epoch is the mean over the
epochs that train the refiner (refine phase; every epoch for joint and baseline rows). Parameters are the
refiner's own.

Writes a Markdown table to ``<out>.md`` and the same numbers to ``<out>.json`` after every row (a run
cut short keeps what it measured). ``--quick`` checks the script end to end in a couple of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spntune.config import TrialConfig, flatten, load_yaml
from spntune.reporting import EpochReport, Reporter
from spntune.trainables import build_model, train_segmentation

ROOT = Path(__file__).resolve().parents[1]
REFINERS = ("cspn", "dyspn")
AFFINITY_NETS = ("light", "unet", "shared")
GROUPS = ("two_stage", "joint", "baseline")


@dataclass
class Row:
    """One trial of the table."""

    group: str  # two_stage | joint | baseline
    refiner: str  # none | cspn | dyspn
    affinity_net: str  # light | unet | shared | - (none)
    epochs: str  # "4+4" (coarse + refine) or "8"
    config: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    seconds_per_epoch: float = float("nan")
    refiner_params: int = 0
    wall_seconds: float = float("nan")
    coarse_cached_epochs: int = 0
    last_gain: float = float("nan")  # refined - coarse mIoU of the last epoch, at training size


class _Epochs(Reporter):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def report(self, epoch: EpochReport) -> None:
        self.rows.append(dict(epoch.metrics))


def base_config(args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """configs/camvid.yaml with this benchmark's size, limits and epochs (flat, dotted keys)."""
    cfg = flatten(load_yaml(ROOT / "configs" / "camvid.yaml"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("refiner.")}
    cfg |= {
        "data.root": str(args.data_root),
        "data.image_size": list(args.image_size),
        "data.limit_train": args.limit_train,
        "data.limit_val": args.limit_val,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
        "train.device": "cpu",
        "train.viz_samples": 0,
        "train.final_eval": True,
        "train.coarse_cache": True,
        "train.coarse_cache_dir": str(cache_dir),
        "data.cache_dir": str(cache_dir / "data"),  # the image cache (decoded once for all rows)
    }
    return cfg


def refiner_config(kind: str, affinity_net: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "none":
        return {"refiner.kind": "none"}
    kernel = args.cspn_kernel if kind == "cspn" else args.dyspn_kernel
    return {"refiner.kind": kind, "refiner.kernel_size": kernel, "refiner.iterations": args.iterations,
            "refiner.channels": args.channels, "refiner.affinity_net": affinity_net}  # fmt: skip


def plan(args: argparse.Namespace, base: dict[str, Any]) -> list[Row]:
    """The rows asked for by ``--groups``, ``--refiners`` and ``--affinity-nets``: the frozen coarse
    network and the baseline first, then two-stage rows (cheap: the coarse phase is cached), then joint."""
    c, r, j = args.coarse_epochs, args.refine_epochs, args.joint_epochs
    two_stage = {"train.stage": "two_stage", "train.coarse_epochs": c, "train.refine_epochs": r}
    rows: list[Row] = []
    if "two_stage" in args.groups:
        rows.append(Row("two_stage", "none", "-", f"{c}", {**base, **two_stage, **refiner_config("none", "", args)}))
    if "baseline" in args.groups:  # early: every later row is compared with it
        rows.append(Row("baseline", "none", "-", f"{c + r}", {**base, "train.stage": "joint", "train.epochs": c + r,
                                                             **refiner_config("none", "", args)}))  # fmt: skip
    if "two_stage" in args.groups:
        for kind in args.refiners:
            for net in args.affinity_nets:
                rows.append(Row("two_stage", kind, net, f"{c}+{r}", {**base, **two_stage, **refiner_config(kind, net, args)}))  # fmt: skip
    if "joint" in args.groups:
        joint = {"train.stage": "joint", "train.epochs": j}
        if j != c + r:  # else the baseline row is the joint row without a refiner
            rows.append(Row("joint", "none", "-", f"{j}", {**base, **joint, **refiner_config("none", "", args)}))
        for kind in args.refiners:
            for net in args.affinity_nets:
                rows.append(Row("joint", kind, net, f"{j}", {**base, **joint, **refiner_config(kind, net, args)}))
    return rows


def run_row(row: Row, num_classes: int) -> None:
    cfg = TrialConfig.from_dict(row.config)
    row.refiner_params = sum(p.numel() for p in build_model(cfg, num_classes).refiner.parameters())
    epochs = _Epochs()
    t0 = time.perf_counter()
    train_segmentation(row.config, epochs)
    row.wall_seconds = time.perf_counter() - t0
    last = epochs.rows[-1]
    row.scores = {k: float(v) for k, v in last.items() if k.startswith("final_") and isinstance(v, (int, float))}
    row.last_gain = float(last["refined_miou"]) - float(last["coarse_miou"])
    refining = [e for e in epochs.rows if e["phase"] in ("refine", "joint")] or epochs.rows
    row.seconds_per_epoch = statistics.mean(float(e["epoch_seconds"]) for e in refining)
    row.coarse_cached_epochs = sum(int(e.get("coarse_cached", 0)) for e in epochs.rows)


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def _gain(x: float) -> str:
    return f"{100 * x:+.2f}"


def markdown(rows: list[Row], header: dict[str, Any]) -> str:
    baseline = next((r for r in rows if r.group == "baseline" and r.scores), None)
    base_miou = baseline.scores.get("final_refined_miou") if baseline else None
    base_biou = baseline.scores.get("final_refined_boundary_iou") if baseline else None
    lines = [
        "# Refinement gain on CamVid (camvid-mini val, original resolution)",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        "",
        "mIoU and boundary IoU in points (x100) at each image's original size (final_* metrics: the best "
        "epoch's weights, by refined mIoU at training size; best epoch says which: for two-stage rows an "
        "epoch <= the coarse epochs means the trained refiner never beat its identity start). gain = refined "
        "- coarse of the same trial; vs baseline = refined - the equal-compute baseline (the coarse network "
        "alone, coarse + refine epochs). last-epoch gain: refined - coarse mIoU of the last epoch at training "
        "size (the trained refiner, whether or not its epoch was the best).",
        "",
        "| stage | refiner | affinity net | epochs | coarse mIoU | refined mIoU | gain | coarse bIoU | refined bIoU "
        "| gain | vs baseline mIoU | vs baseline bIoU | best epoch | last-epoch gain | s/epoch | refiner params |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r.scores
        if not s:
            lines.append(f"| {r.group} | {r.refiner} | {r.affinity_net} | {r.epochs} | (not run) |||||||||||||")
            continue
        cm, rm = s["final_coarse_miou"], s["final_refined_miou"]
        cb, rb = s["final_coarse_boundary_iou"], s["final_refined_boundary_iou"]
        vs_m = _gain(rm - base_miou) if base_miou is not None else "-"
        vs_b = _gain(rb - base_biou) if base_biou is not None else "-"
        lines.append(
            f"| {r.group} | {r.refiner} | {r.affinity_net} | {r.epochs} | {_pts(cm)} | {_pts(rm)} | {_gain(rm - cm)} "
            f"| {_pts(cb)} | {_pts(rb)} | {_gain(rb - cb)} | {vs_m} | {vs_b} | {int(s.get('final_epoch', 0))} "
            f"| {_gain(r.last_gain)} | {r.seconds_per_epoch:.1f} "
            f"| {r.refiner_params:,} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    import torch

    return f"{cpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU only, shared with other jobs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "camvid-mini")
    p.add_argument("--image-size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (default: all 367)")
    p.add_argument("--limit-val", type=int, default=None, help="first N validation images (default: all 101)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--coarse-epochs", type=int, default=4)
    p.add_argument("--refine-epochs", type=int, default=4)
    p.add_argument("--joint-epochs", type=int, default=8)
    p.add_argument("--cspn-kernel", type=int, default=3)
    p.add_argument("--dyspn-kernel", type=int, default=7)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--refiners", nargs="+", choices=REFINERS, default=list(REFINERS))
    p.add_argument("--affinity-nets", nargs="+", choices=AFFINITY_NETS, default=list(AFFINITY_NETS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "refinement_gain",
                   help="writes OUT.md and OUT.json")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=None, help="coarse cache folder (default: a fresh temp folder)")
    p.add_argument("--quick", action="store_true",
                   help="check the script in a few minutes: 16/8 images, 64x96, 1+1 / 2 epochs")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.limit_train, args.limit_val = [64, 96], 16, 8
        args.coarse_epochs, args.refine_epochs, args.joint_epochs = 1, 1, 2
        args.out = args.out.with_name(args.out.name + "_quick")
    if not (args.data_root / "classes.txt").is_file():
        p.error(f"--data-root {args.data_root}: no camvid-mini there (classes.txt missing)")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = parse_args(argv)
    num_classes = len((args.data_root / "classes.txt").read_text().split())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spntune-gain-cache-") as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        rows = plan(args, base_config(args, cache_dir))
        header = {
            "machine": machine(),
            "data": f"{args.data_root.name}, train {args.limit_train or 'all'} / val {args.limit_val or 'all'} images, "
            f"trained at {args.image_size[0]}x{args.image_size[1]}, scored at original size (192x256)",
            "model": "U-Net / ResNet-18 coarse (no pretrained weights), CE loss, AdamW lr 1e-3 cosine, batch "
            f"{args.batch_size}, seed {args.seed}",
            "refiners": f"CSPN {args.cspn_kernel}x{args.cspn_kernel}, DySPN {args.dyspn_kernel}x{args.dyspn_kernel}, "
            f"T={args.iterations}, affinity channels {args.channels}",
            "epochs": f"two-stage {args.coarse_epochs} coarse (trained once, coarse cache) + {args.refine_epochs} "
            f"refine; joint {args.joint_epochs}; baseline {args.coarse_epochs + args.refine_epochs}",
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }
        start = time.perf_counter()
        for i, row in enumerate(rows, 1):
            print(f"[{i}/{len(rows)}] {row.group} {row.refiner} {row.affinity_net} ({row.epochs} epochs) ...",
                  flush=True)  # fmt: skip
            run_row(row, num_classes)
            s = row.scores
            print(f"    coarse {_pts(s['final_coarse_miou'])} -> refined {_pts(s['final_refined_miou'])} mIoU, "
                  f"bIoU {_pts(s['final_coarse_boundary_iou'])} -> {_pts(s['final_refined_boundary_iou'])}, "
                  f"{row.seconds_per_epoch:.1f} s/epoch, {row.wall_seconds:.0f} s", flush=True)  # fmt: skip
            header["wall time"] = f"{time.perf_counter() - start:.0f} s for {i} of {len(rows)} rows"
            args.out.with_suffix(".md").write_text(markdown(rows, header))
            args.out.with_suffix(".json").write_text(json.dumps(
                {"header": header, "rows": [{k: v for k, v in asdict(r).items() if k != "config"} | {
                    "config": r.config} for r in rows]}, indent=1, default=str))  # fmt: skip
    print(markdown(rows, header))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
