"""``train_segmentation(config)``: one trial, as a plain function of a config dict.

It validates the dict into ``TrialConfig``, builds data, model, loss and optimiser from it,
trains for the configured epochs and calls ``reporter`` once per epoch with flat scalar
metrics and a checkpoint folder. It does not know who called it: the CLI's debug mode passes
a console reporter, Ray Tune a reporter around ``tune.report``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spntune.config import TrialConfig
from spntune.data import build_datasets
from spntune.losses import build_loss
from spntune.metrics import SegmentationMeter
from spntune.models import REFINERS, RefinedSegmenter, build_coarse

__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_FILE",
    "NonFiniteLossError",
    "Reporter",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "read_history",
    "train_segmentation",
]

CHECKPOINT_FILE = "checkpoint.pt"
#: Beside every checkpoint: the trial's per-epoch metrics up to that checkpoint, one dict per epoch.
#: It travels with the checkpoint, so a retried or resumed trial continues it: after any number of
#: crashes it holds each epoch that led to the final model exactly once. (Ray's own ``result.json``
#: cannot promise that: on a retry Ray copies back the last *synced* copy, which may lack epochs.)
HISTORY_FILE = "history.json"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the trial cannot continue."""


class Reporter:
    """Receives per-epoch results. Subclass and override what you need; the base does nothing.

    ``wants_checkpoints``: when True, every epoch's checkpoint folder is passed to ``report``
    (it is deleted after the call returns, so copy what you keep).
    """

    wants_checkpoints = False

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Called once per epoch with flat scalar metrics."""

    def progress(self, stage: str, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        """Called after each training batch."""

    def resume_checkpoint(self) -> Path | None:
        """A checkpoint folder to resume from (Ray Tune's restored checkpoint), or None."""
        return None

    def trial_id(self) -> str | None:
        """The scheduler's id for this trial (Ray's trial id), or None in-process."""
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: TrialConfig, num_classes: int) -> RefinedSegmenter:
    """Coarse network + refiner from a validated config."""
    coarse = build_coarse(cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights, num_classes, **cfg.model.kwargs)
    r = cfg.refiner
    kwargs: dict[str, Any] = {}
    if r.kind == "cspn":
        kwargs = dict(kernel_size=r.kernel_size, iterations=r.iterations, channels=r.channels,
                      centre=r.centre, propagate=r.propagate, affinity_norm=r.affinity_norm)  # fmt: skip
    elif r.kind == "dyspn":
        kwargs = dict(kernel_size=r.kernel_size, iterations=r.iterations, channels=r.channels, propagate=r.propagate)
    refiner = REFINERS[r.kind](num_classes=num_classes, **kwargs)
    return RefinedSegmenter(coarse, refiner)


@dataclass
class _Phase:
    """A stretch of epochs with one optimiser: joint, or coarse / refine of two-stage training."""

    name: str
    first_epoch: int  # 0-based, global
    epochs: int
    params: list[nn.Parameter]
    coarse_weight: float  # weight of the coarse loss
    refined_weight: float


def _phases(cfg: TrialConfig, model: RefinedSegmenter) -> list[_Phase]:
    t = cfg.train
    if t.stage == "joint":
        refined_weight = 0.0 if cfg.refiner.kind == "none" else 1.0
        coarse_weight = 1.0 if cfg.refiner.kind == "none" else t.coarse_loss_weight
        return [_Phase("joint", 0, t.epochs, list(model.parameters()), coarse_weight, refined_weight)]
    phases = [_Phase("coarse", 0, t.coarse_epochs, list(model.coarse.parameters()), 1.0, 0.0)]
    if cfg.refiner.kind != "none":  # two-stage without a refiner is only the coarse phase
        phases.append(_Phase("refine", t.coarse_epochs, t.refine_epochs, list(model.refiner.parameters()), 0.0, 1.0))
    return phases


def _optimiser(
    cfg: TrialConfig, params: list[nn.Parameter], epochs: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    o = cfg.optim
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    return opt, sched


def _loader(ds: Dataset, batch_size: int, train: bool, workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train and len(ds) < batch_size:  # type: ignore[arg-type]
        # A split smaller than one batch (tiny debug sets) still yields one full batch: BatchNorm
        # layers that pool to 1x1 (DeepLab, PSPNet) cannot train on a single sample.
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch_size, generator=generator)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        generator=generator,
        persistent_workers=workers > 0,
    )


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "class"


@torch.no_grad()
def evaluate(
    model: RefinedSegmenter,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """Coarse and refined metrics on a loader, plus refined mIoU after every step t = 0..T.

    Returns nested results: ``{"coarse": {...}, "refined": {...}, "steps_miou": [...],
    "val_loss": float}``.
    """
    model.eval()
    coarse_meter = SegmentationMeter(num_classes)
    refined_meter = SegmentationMeter(num_classes)
    step_meters: list[SegmentationMeter] = []
    loss_sum, loss_n = 0.0, 0
    forward_seconds, images = 0.0, 0
    for image, target in loader:
        image, target = image.to(device), target.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, enabled=amp):
            out = model(image, return_steps=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_seconds += time.perf_counter() - t0
        images += image.shape[0]
        coarse_meter.update(out.coarse_logits.argmax(1), target)
        refined_meter.update(out.refined_logits.argmax(1), target)
        if not step_meters:
            step_meters = [SegmentationMeter(num_classes, boundary=False) for _ in out.steps]
        for meter, step in zip(step_meters, out.steps, strict=True):
            meter.update(step.argmax(1), target)
        if loss_fn is not None:
            loss_sum += float(loss_fn(out.refined_logits.float(), target)) * image.shape[0]
            loss_n += image.shape[0]
    return {
        "coarse": coarse_meter.compute(),
        "refined": refined_meter.compute(),
        "steps_miou": [m.compute()["miou"] for m in step_meters],
        "val_loss": loss_sum / max(loss_n, 1),
        "infer_ms_per_image": 1000 * forward_seconds / max(images, 1),
    }


def flat_metrics(results: dict[str, Any], class_names: list[str]) -> dict[str, float]:
    """Flatten ``evaluate`` results to scalar metric names (what Ray and MLflow store)."""
    out: dict[str, float] = {}
    for stream in ("coarse", "refined"):
        r = results[stream]
        for key in ("miou", "pixel_acc", "mean_dice", "boundary_iou"):
            out[f"{stream}_{key}"] = r[key]
        for name, iou in zip(class_names, r["per_class_iou"], strict=True):
            out[f"{stream}_iou_{_sanitize(name)}"] = iou
    out["refined_miou_gain"] = out["refined_miou"] - out["coarse_miou"]
    for t, miou in enumerate(results["steps_miou"]):
        out[f"refined_miou_t{t}"] = miou
    out["val_loss"] = results["val_loss"]
    out["infer_ms_per_image"] = results["infer_ms_per_image"]
    return out


def _batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for image, target in loader:
        yield image.to(device, non_blocking=True), target.to(device, non_blocking=True)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    cfg: TrialConfig,
    epoch: int,
    phase: str,
    optimiser: torch.optim.Optimizer | None,
    scheduler: Any,
    extra: dict[str, Any],
) -> None:
    """Everything needed to resume or predict; loads with ``torch.load(weights_only=True)``.

    ``extra["history"]`` (the per-epoch metrics so far) is also written as ``history.json`` beside
    the checkpoint, so the driver reads it without loading weights.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if "history" in extra:
        (path.parent / HISTORY_FILE).write_text(json.dumps(extra["history"]))
    torch.save(
        {
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "epoch": epoch,
            "phase": phase,
            "optimizer": optimiser.state_dict() if optimiser is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra,
        },
        path,
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a folder holding ``checkpoint.pt``) safely."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_history(text: str) -> list[dict[str, Any]]:
    """Parse a ``history.json``; an unreadable one reads as no history (the caller falls back)."""
    try:
        history = json.loads(text)
    except ValueError:
        return []
    return [row for row in history if isinstance(row, dict)] if isinstance(history, list) else []


def train_segmentation(
    config: dict[str, Any],
    reporter: Reporter | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train one trial; returns the last epoch's metrics (flat) and the paths it wrote.

    Args:
        config: nested or dotted-flat trial config (validated into ``TrialConfig``).
        reporter: receives metrics (and checkpoints) once per epoch; None = silent.
        resume_from: checkpoint file or folder to continue from (overrides the reporter's).

    Raises:
        ConfigError: invalid config (names the key).
        DatasetError: bad dataset files (names the file).
        NonFiniteLossError: the loss became NaN/inf.
    """
    cfg = TrialConfig.from_dict(config)
    reporter = reporter or Reporter()
    tracker = _start_tracker(cfg, reporter)  # before data and model: their failures are tracked too
    try:
        result = _run_trial(cfg, reporter, resume_from, tracker)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ray stops a trial (ASHA) with SystemExit
        if tracker is not None:
            tracker.end("KILLED", "stopped by the scheduler" if isinstance(exc, SystemExit) else "interrupted")
        raise
    except BaseException as exc:
        if tracker is not None:
            tracker.end("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    if tracker is not None:
        tracker.end("FINISHED")
    return result


def _run_trial(cfg: TrialConfig, reporter: Reporter, resume_from: str | Path | None, tracker: Any) -> dict[str, Any]:
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    amp = cfg.train.amp and device.type == "cuda"

    train_ds, val_ds, class_names = build_datasets(cfg.data, cfg.train.seed)
    num_classes = len(class_names)
    model = build_model(cfg, num_classes).to(device)
    loss_fn = build_loss(cfg.train.loss)
    train_loader = _loader(train_ds, cfg.train.batch_size, True, cfg.data.num_workers, cfg.train.seed)
    val_loader = _loader(val_ds, cfg.train.batch_size, False, cfg.data.num_workers, cfg.train.seed)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, state = 0, None
    resume_path = Path(resume_from) if resume_from else reporter.resume_checkpoint()
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        start_epoch = int(state["epoch"]) + 1

    output_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    metrics = _train_loop(cfg, reporter, model, loss_fn, train_loader, val_loader, val_ds, class_names,
                          device, amp, scaler, start_epoch, state, output_dir, tracker)  # fmt: skip
    if output_dir is not None and cfg.train.viz_samples > 0:
        from spntune.viz import save_pictures, trial_pictures

        save_pictures(
            trial_pictures(model, val_ds, class_names, cfg.train.viz_samples, device, gradcam=False), output_dir
        )
    return {"metrics": metrics, "class_names": class_names, "output_dir": str(output_dir) if output_dir else None}


def _maybe_inject_crash(epoch: int, point: str) -> None:
    """Fault injection for recovery tests: ``SPNTUNE_CRASH_ONCE=<marker file>:<epoch>[:<point>]`` makes
    the first trial that reaches that (1-based) epoch raise once, creating the marker so retries run
    normally. ``point``: ``start`` (default; right after the previous epoch's report) or ``report``
    (the epoch is trained, checkpointed and logged to MLflow, but not yet reported)."""
    spec = os.environ.get("SPNTUNE_CRASH_ONCE")
    if not spec:
        return
    head, _, last = spec.rpartition(":")
    marker, _, at_epoch = head.rpartition(":") if last in ("start", "report") else (head, "", last)
    if epoch + 1 != int(at_epoch) or point != (last if last in ("start", "report") else "start"):
        return
    try:
        Path(marker).open("x").close()  # atomic: exactly one crash across all workers
    except FileExistsError:
        return
    raise RuntimeError(f"injected crash at the {point} of epoch {epoch + 1} (SPNTUNE_CRASH_ONCE)")


def _start_tracker(cfg: TrialConfig, reporter: Reporter) -> Any:
    if not cfg.tracking.uri:
        return None
    from spntune.config import flatten
    from spntune.tracking import TrialTracker, dump_config

    params = {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith("tracking.")}
    return TrialTracker(cfg.tracking.model_dump(), reporter.trial_id(), params, dump_config(cfg.to_dict()))


def _train_loop(cfg: TrialConfig, reporter: Reporter, model: RefinedSegmenter, loss_fn: nn.Module,
                train_loader: DataLoader, val_loader: DataLoader, val_ds: Dataset, class_names: list[str],
                device: torch.device, amp: bool, scaler: Any, start_epoch: int, state: dict[str, Any] | None,
                output_dir: Path | None, tracker: Any) -> dict[str, Any]:  # fmt: skip
    """The epochs of every phase; returns the last epoch's metrics."""
    num_classes = len(class_names)
    metrics: dict[str, Any] = {}
    resumed_extra = state.get("extra", {}) if state is not None else {}
    best = float(resumed_extra.get("metrics", {}).get("best_refined_miou", -math.inf))
    # Epochs before the resume point, as recorded by the checkpoint we resume from.
    history = [row for row in resumed_extra.get("history", []) if row.get("epoch", 0) <= start_epoch]
    for phase in _phases(cfg, model):
        if start_epoch >= phase.first_epoch + phase.epochs:
            continue  # finished before the resume point
        for p in model.parameters():
            p.requires_grad_(False)
        for p in phase.params:
            p.requires_grad_(True)
        optimiser, scheduler = _optimiser(cfg, phase.params, phase.epochs, len(train_loader))
        if state is not None and state.get("phase") == phase.name and state.get("optimizer"):
            optimiser.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        for epoch in range(max(start_epoch, phase.first_epoch), phase.first_epoch + phase.epochs):
            _maybe_inject_crash(epoch, "start")
            # Re-seed per epoch so a resumed trial sees the same batches as an uninterrupted one.
            seed_everything(cfg.train.seed + epoch)
            train_loader.generator.manual_seed(cfg.train.seed + epoch)  # type: ignore[union-attr]  # sampler's too
            model.train()
            if phase.name == "refine":
                model.coarse.eval()  # frozen: BatchNorm statistics stay as trained
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "coarse": 0.0, "refined": 0.0}
            seen = 0
            for i, (image, target) in enumerate(_batches(train_loader, device)):
                with torch.autocast(device_type=device.type, enabled=amp):
                    out = model(image)
                coarse_loss = (
                    loss_fn(out.coarse_logits.float(), target)
                    if phase.coarse_weight
                    else torch.zeros((), device=device)
                )
                refined_loss = (
                    loss_fn(out.refined_logits.float(), target)
                    if phase.refined_weight
                    else torch.zeros((), device=device)
                )
                loss = phase.coarse_weight * coarse_loss + phase.refined_weight * refined_loss
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1} "
                        f"(phase {phase.name}, loss {cfg.train.loss!r}, optim.lr={cfg.optim.lr}); "
                        "try a lower optim.lr or set optim.grad_clip"
                    )
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip is not None:
                    scaler.unscale_(optimiser)
                    torch.nn.utils.clip_grad_norm_(phase.params, cfg.optim.grad_clip)
                scaler.step(optimiser)
                scaler.update()
                scheduler.step()
                n = image.shape[0]
                seen += n
                loss_value = loss.item()
                sums["loss"] += loss_value * n
                sums["coarse"] += coarse_loss.item() * n
                sums["refined"] += refined_loss.item() * n
                reporter.progress(phase.name, epoch + 1, i + 1, len(train_loader), loss_value)
            train_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            results = evaluate(model, val_loader, num_classes, device, loss_fn, amp)
            val_seconds = time.perf_counter() - t1
            metrics = {
                "epoch": epoch + 1,
                "phase": phase.name,
                "train_loss": sums["loss"] / max(seen, 1),
                "train_loss_coarse": sums["coarse"] / max(seen, 1),
                "train_loss_refined": sums["refined"] / max(seen, 1),
                **flat_metrics(results, class_names),
                "epoch_seconds": train_seconds + val_seconds,
                "train_images_per_s": seen / max(train_seconds, 1e-9),
                "val_seconds": val_seconds,
                "lr": optimiser.param_groups[0]["lr"],
            }
            current = metrics["refined_miou"]
            is_best = not math.isnan(current) and current > best
            best = current if is_best else best
            metrics["best_refined_miou"] = best
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
            extra = {
                "class_names": class_names,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                "history": history,
            }
            # Persist before reporting: a reporter may stop the trial (ASHA, interruption).
            if output_dir is not None:
                save_checkpoint(
                    output_dir / CHECKPOINT_FILE, model, cfg, epoch, phase.name, optimiser, scheduler, extra
                )
            # MLflow first too: Ray stops a trial by raising inside its report call.
            if tracker is not None:
                _track_epoch(tracker, cfg, metrics, results, is_best, model, epoch + 1,
                             phase.name, extra, val_ds, class_names, device)  # fmt: skip
            _maybe_inject_crash(epoch, "report")
            if reporter.wants_checkpoints:
                with tempfile.TemporaryDirectory(prefix="spntune-ckpt-") as tmp:
                    save_checkpoint(
                        Path(tmp) / CHECKPOINT_FILE, model, cfg, epoch, phase.name, optimiser, scheduler, extra
                    )
                    reporter.report(metrics, Path(tmp))
            else:
                reporter.report(metrics, None)
    return metrics


def _track_epoch(tracker: Any, cfg: TrialConfig, metrics: dict[str, Any], results: dict[str, Any], is_best: bool,
                 model: RefinedSegmenter, epoch: int, phase: str, extra: dict[str, Any], val_ds: Dataset,
                 class_names: list[str], device: torch.device) -> None:  # fmt: skip
    """Per-epoch metrics; at a new best epoch also the checkpoint, step curve and pictures."""
    tracker.log_epoch(metrics, epoch)
    if not is_best:
        return
    tracker.best_steps_miou = results["steps_miou"]
    pictures: dict[str, Any] = {}
    if cfg.tracking.viz and cfg.train.viz_samples > 0:
        from spntune.viz import trial_pictures

        pictures = trial_pictures(model, val_ds, class_names, cfg.train.viz_samples, device, cfg.tracking.gradcam)
    with tempfile.TemporaryDirectory(prefix="spntune-best-") as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        save_checkpoint(path, model, cfg, epoch - 1, phase, None, None, extra)  # weights only: for predict
        tracker.log_best(epoch, path, pictures)
