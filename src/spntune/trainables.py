"""``train_segmentation(config, reporter)``: one trial, as a plain function of a config dict.

It validates the dict into ``TrialConfig``, builds data, model, loss and optimiser from it,
trains for the configured epochs and tells one ``Reporter`` (``reporting.py``) everything: once
per epoch an ``EpochReport`` (flat scalar metrics, and ways to write a checkpoint and pictures),
and at the end the trial's status. It does not know who called it: the CLI's debug mode passes
a console reporter, Ray Tune a reporter around ``tune.report``; with ``tracking.uri`` set the
trial puts an MLflow reporter in front of the caller's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import resource
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from spntune.coarse_cache import (
    CoarseCache,
    CoarseClaim,
    CoarseEntry,
    coarse_key_fields,
    data_fingerprint,
    replay_row,
)
from spntune.config import ModelConfig, TrialConfig
from spntune.data import build_datasets
from spntune.data.cache import CachedDataset
from spntune.data.transforms import build_transform
from spntune.errors import CheckpointError, ConfigError, NonFiniteLossError, TrialOutOfMemoryError
from spntune.losses import build_loss
from spntune.metrics import SegmentationMeter, class_ids
from spntune.models import REFINERS, RefinedSegmenter, build_coarse
from spntune.models.coarse import cpu_bf16_native, feature_channels
from spntune.models.memory import release_buffers
from spntune.names import dropped_model_kwargs
from spntune.predict_input import CHECKPOINT_FILE, check_checkpoint_path
from spntune.reporting import EpochReport, Reporter, Reporters, TrialStopped
from spntune.scoring import flat_metrics, score_at_original_size
from spntune.status import TrialStatus
from spntune.tracking import MLflowReporter
from spntune.viz import save_pictures, trial_pictures

__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_FILE",
    "NonFiniteLossError",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "read_history",
    "restore_model",
    "train_segmentation",
]

#: Beside every checkpoint: the trial's per-epoch metrics up to that checkpoint, one dict per epoch.
#: It travels with the checkpoint, so a retried or resumed trial continues it: after any number of
#: crashes it holds each epoch that led to the final model exactly once. (Ray's own ``result.json``
#: cannot promise that: on a retry Ray copies back the last *synced* copy, which may lack epochs.)
HISTORY_FILE = "history.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: TrialConfig, num_classes: int) -> RefinedSegmenter:
    """Coarse network + refiner from a validated config."""
    coarse = build_coarse(cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights, num_classes, **cfg.model.kwargs)
    # The refiner's settings, plus what only the model knows: the coarse weights' source (for a U-Net
    # affinity network) and the coarse decoder's width (for the shared one).
    shared = getattr(cfg.refiner, "affinity_net", "") == "shared"
    context = {
        "encoder_weights": cfg.model.encoder_weights,
        "feature_channels": feature_channels(coarse) if shared else None,
    }
    refiner = REFINERS[cfg.refiner.kind](num_classes=num_classes, **cfg.refiner.model_dump(exclude={"kind"}), **context)
    return RefinedSegmenter(coarse, refiner)


def _is_out_of_memory(exc: BaseException, limited: bool) -> bool:
    """CUDA's ``OutOfMemoryError``, Python's ``MemoryError`` and the CPU allocator's failure (a
    ``RuntimeError`` saying it "can't allocate memory"); under ``train.memory_limit_gb`` also oneDNN's
    "could not create a primitive", which is how it reports that its own allocation failed."""
    text = str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text:
        return True
    return limited and "could not create a primitive" in text


def _out_of_memory(cfg: TrialConfig, exc: BaseException) -> TrialOutOfMemoryError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    limit = f", train.memory_limit_gb={cfg.train.memory_limit_gb:g}" if cfg.train.memory_limit_gb else ""
    return TrialOutOfMemoryError(
        f"out of memory (train.batch_size={cfg.train.batch_size}, data.image_size={list(cfg.data.image_size)}"
        f"{limit}): {first}; lower train.batch_size or data.image_size, or give each trial more memory"
    )


@contextmanager
def _memory_limit(gigabytes: float | None) -> Iterator[None]:
    """``train.memory_limit_gb``: the host memory a trial may allocate on top of what its process holds
    when the trial starts (the imported libraries). Enforced with Linux ``RLIMIT_DATA`` (heap and
    private mappings) while the trial runs, so a runaway trial fails with a readable out-of-memory
    error instead of the kernel's OOM killer taking the node's other trials with it."""
    used = _data_segment_bytes() if gigabytes else None
    if used is None:  # no limit asked for, or no /proc (not Linux): nothing to enforce
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + int(gigabytes * 2**30)  # type: ignore[operator]
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))  # a reused Ray actor runs other trials


def _data_segment_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    cfg: TrialConfig, params: list[nn.Parameter], epochs: int, steps_per_epoch: int, fused: bool | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimiser and LR schedule of one phase. ``fused``: None picks the fused kernels where every
    parameter is on CUDA (a few launches per step instead of one per tensor and operation; under AMP
    GradScaler hands them its scale and inf flag instead of reading the flag back to the host, a wait for
    the GPU, every step); True forces them (tests run them on the CPU)."""
    o = cfg.optim
    if fused is None:
        fused = all(p.is_cuda for p in params)
    choice = True if fused else None  # None: torch's default (foreach where it can)
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=choice
        )
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=choice)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=choice)
    _zero_momentum(opt)
    if o.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    return opt, sched


def _zero_momentum(optimiser: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for fused SGD's parameters that have none yet.

    Fused SGD creates a missing buffer with ``empty_like`` and lets its kernel fill it; where GradScaler
    finds an inf that step, the kernel returns at once and the uninitialised buffer stays in the state, so
    the next step adds ``0.9 * garbage``. A first step that overflows is common under AMP (the scale
    starts at 2^16). With no dampening a zero buffer gives the unfused first step exactly (``buf = g``)."""
    if not isinstance(optimiser, torch.optim.SGD):
        return
    for group in optimiser.param_groups:
        if group.get("fused") and group.get("momentum", 0):
            for p in group["params"]:
                optimiser.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def load_optimiser_state(optimiser: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimiser.load_state_dict(state)``, keeping the ``fused`` choice ``_optimiser`` made here.

    A state dict carries each group's ``fused`` flag, and loading it would take the flag of the machine that
    wrote it: a checkpoint from the CPU (or from before the fused optimisers) resumed on CUDA would run the
    unfused step, which refuses the scale and inf flag GradScaler hands an optimiser built fused. The flag
    is set in the state before loading, since ``load_state_dict`` reads it to place Adam's ``step`` (on the
    parameter's device for the fused kernels, where the CPU-written one would stay on the CPU)."""
    chosen = [group.get("fused") for group in optimiser.param_groups]
    groups = [{**saved, "fused": fused} for saved, fused in zip(state["param_groups"], chosen, strict=True)]
    optimiser.load_state_dict({**state, "param_groups": groups})
    _zero_momentum(optimiser)  # parameters the checkpoint holds no buffer for


def trial_cpus() -> int:
    """CPUs this trial may use: the process's CPU affinity, capped by torch's thread count (Ray sets
    ``OMP_NUM_THREADS`` to a trial's ``cpus_per_trial``)."""
    return max(1, min(len(os.sched_getaffinity(0)), torch.get_num_threads()))


def loader_workers(setting: int | str, device: torch.device, cpus: int | None = None) -> int:
    """``data.num_workers`` as a number of DataLoader worker processes.

    ``auto``: on CUDA, ``min(8, cpus - 1)`` (the trial's process only feeds the GPU); on the CPU,
    ``cpus // 4`` capped at 4, so 0 below four CPUs: training's own threads use the cores, and with
    the image cache a batch is a memory read plus augmentation (``benchmarks/bench_loader.py``).
    """
    if setting != "auto":
        return int(setting)
    cpus = trial_cpus() if cpus is None else cpus
    if device.type == "cuda":
        return max(0, min(8, cpus - 1))
    return min(4, cpus // 4)


def _loader(ds: Dataset, batch_size: int, train: bool, workers: int, seed: int, pin: bool = False) -> DataLoader:
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
        pin_memory=pin,
    )


@torch.no_grad()
def evaluate(
    model: RefinedSegmenter,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    amp: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
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
        image, target = image.to(device, memory_format=memory_format), target.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, enabled=amp):
            out = model(image, return_steps=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_seconds += time.perf_counter() - t0
        images += image.shape[0]
        coarse_meter.update(class_ids(out.coarse_logits), target)
        refined_meter.update(class_ids(out.refined_logits), target)
        if not step_meters:
            step_meters = [SegmentationMeter(num_classes, boundary=False) for _ in out.steps]
        for meter, step in zip(step_meters, out.steps, strict=True):
            meter.update(class_ids(step), target)
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


def _batches(loader: DataLoader, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    for image, target in loader:
        yield image.to(device, non_blocking=True, memory_format=memory_format), target.to(device, non_blocking=True)


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
    the checkpoint, so the driver reads it without loading weights. The checkpoint is written to a
    temporary file and renamed: a crash mid-write keeps the previous one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if "history" in extra:
        (path.parent / HISTORY_FILE).write_text(json.dumps(extra["history"]))
    state = {
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "epoch": epoch,
        "phase": phase,
        "optimizer": optimiser.state_dict() if optimiser is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a folder holding ``checkpoint.pt``) safely: ``weights_only=True``
    never executes a pickle's code.

    Raises:
        FileNotFoundError: nothing there.
        CheckpointError: not a spntune checkpoint (truncated, another kind of file, an arbitrary pickle).
    """
    path = check_checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle weights_only refuses, not a torch file at all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable spntune checkpoint ({reason[:200]})") from None
    missing = [k for k in ("model", "config", "epoch", "extra") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a spntune checkpoint: it lacks {', '.join(missing)}")
    problems = _structure_problems(state)
    if problems:
        raise CheckpointError(f"{path} is not a usable spntune checkpoint: {'; '.join(problems)}")
    return state


def _structure_problems(state: dict[str, Any]) -> list[str]:
    """What is wrong with the values of a checkpoint that has the right keys (empty: nothing)."""

    def kind(value: Any) -> str:
        return f"{type(value).__name__} {value!r}"[:80]

    problems = []
    weights, extra = state["model"], state["extra"]
    if not isinstance(weights, dict):
        problems.append(f"'model' is a {kind(weights)}, expected a dict of weight tensors")
    elif not weights:
        problems.append("'model' holds no weights")
    elif bad := [str(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, Tensor)]:
        problems.append(f"'model' holds entries that are not named tensors: {', '.join(bad[:3])}")
    if not isinstance(state["config"], dict):
        problems.append(f"'config' is a {kind(state['config'])}, expected a dict (the trial config)")
    if not isinstance(state["epoch"], int) or isinstance(state["epoch"], bool):
        problems.append(f"'epoch' is a {kind(state['epoch'])}, expected an integer")
    if not isinstance(extra, dict):
        problems.append(f"'extra' is a {kind(extra)}, expected a dict holding class_names")
    elif "class_names" not in extra:
        problems.append("'extra' lacks class_names (the names of the classes the model predicts)")
    elif not (
        isinstance(extra["class_names"], list)
        and extra["class_names"]
        and all(isinstance(name, str) for name in extra["class_names"])
    ):
        problems.append(f"'extra' class_names is a {kind(extra['class_names'])}, expected a list of class names")
    return problems


def _without_dropped_kwargs(config: Any, source: str | Path) -> Any:
    """``config`` without the ``model.kwargs`` smp dropped unread when the checkpoint's model was built
    (``names.dropped_model_kwargs``; configs refuse them since 2026-12-07), with a warning naming them: the
    weights fit the model built without them."""
    model = config.get("model") if isinstance(config, dict) else None
    kwargs = model.get("kwargs") if isinstance(model, dict) else None
    if not isinstance(kwargs, dict):
        return config
    defaults = ModelConfig.model_fields  # what a config that omits them builds
    arch = str(model.get("arch", defaults["arch"].default))
    encoder = str(model.get("encoder", defaults["encoder"].default))
    dropped = dropped_model_kwargs(arch, encoder, kwargs)
    if not dropped:
        return config
    warnings.warn(f"checkpoint {source}: model.kwargs {', '.join(dropped)} left out: {arch} takes no such "
                  "keyword, and segmentation_models_pytorch dropped it unread when this model was built",
                  stacklevel=3)  # fmt: skip
    return {**config, "model": {**model, "kwargs": {k: v for k, v in kwargs.items() if k not in dropped}}}


def restore_model(state: dict[str, Any], source: str | Path) -> tuple[TrialConfig, RefinedSegmenter]:
    """The config and model a checkpoint holds, its weights loaded.

    Raises:
        CheckpointError: its config is not valid for this version, or the weights do not fit it.
    """
    try:
        cfg = TrialConfig.from_dict(_without_dropped_kwargs(state["config"], source))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {source} holds a config this version cannot use: {exc}") from None
    model = build_model(cfg, len(state["extra"]["class_names"]))
    load_weights(model, state, source)
    return cfg, model


def load_weights(model: nn.Module, state: dict[str, Any], source: str | Path) -> None:
    """Load a checkpoint's weights into ``model``; a checkpoint of another architecture is refused,
    naming the first weights that do not fit."""
    problems = _weight_mismatches(model.state_dict(), state["model"])
    if problems:
        raise CheckpointError(f"checkpoint {source}: its weights do not fit this model: {'; '.join(problems)}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # what the comparison above cannot see
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {source}: its weights do not fit this model ({first[:300]})") from None


def _weight_mismatches(expected: dict[str, Tensor], found: dict[str, Any], shown: int = 3) -> list[str]:
    """The first ``shown`` missing, unexpected and wrongly shaped weights of ``found`` against ``expected``."""

    def listed(names: list[str]) -> str:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} (checkpoint {list(found[k].shape) if isinstance(found[k], Tensor) else type(found[k]).__name__}, "
        f"model {list(v.shape)})"
        for k, v in expected.items()
        if k in found and not (isinstance(found[k], Tensor) and found[k].shape == v.shape)
    ]
    return [
        f"{len(names)} {what}: {listed(names)}"
        for names, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        if names
    ]


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
        reporter: told everything the trial has to say (see ``reporting.Reporter``); None = silent.
            With ``tracking.uri`` set, an MLflow reporter is called before it.
        resume_from: checkpoint file or folder to continue from (overrides the reporter's).

    Raises:
        ConfigError: invalid config (names the key).
        DatasetError: bad dataset files (names the file).
        NonFiniteLossError: the loss became NaN/inf.
        TrialOutOfMemoryError: the trial ran out of memory (names the sizes to lower).
        TrialStopped: a reporter stopped the trial (Ray's scheduler).
    """
    cfg = TrialConfig.from_dict(config)
    caller = reporter or Reporter()
    reporters = Reporters(MLflowReporter(), caller) if cfg.tracking.uri else Reporters(caller)
    reporters.start(cfg, reporters.trial_id())  # before data and model: their failures are reported too
    try:
        try:
            with _memory_limit(cfg.train.memory_limit_gb):
                try:
                    result = _run_trial(cfg, reporters, resume_from)
                finally:
                    release_buffers()  # the propagation's kept buffers go with the trial
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, TrialOutOfMemoryError) or not _is_out_of_memory(exc, bool(cfg.train.memory_limit_gb)):
                raise
            raise _out_of_memory(cfg, exc) from exc
    except (SystemExit, KeyboardInterrupt) as exc:
        if isinstance(exc, TrialStopped):
            reporters.end(TrialStatus.STOPPED, str(exc))
        else:
            reporters.end(TrialStatus.INTERRUPTED, "interrupted")
        raise
    except BaseException as exc:
        reporters.end(TrialStatus.ERROR, f"{type(exc).__name__}: {exc}")
        raise
    reporters.end(TrialStatus.COMPLETED)
    return result


@dataclass
class _Run:
    """Everything built from a trial's config that its epochs use."""

    cfg: TrialConfig
    model: RefinedSegmenter
    loss_fn: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    val_ds: Dataset
    class_names: list[str]
    device: torch.device
    amp: bool
    scaler: Any
    output_dir: Path | None
    memory_format: torch.memory_format  # of the model's 4-d weights and the input batches (train.channels_last)


def _build_run(cfg: TrialConfig) -> _Run:
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    amp = cfg.train.uses_autocast(device.type, cpu_bf16_native())
    if cfg.train.cpu_bf16 and device.type == "cpu" and not amp:
        warnings.warn("train.cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in float32",
                      stacklevel=2)  # fmt: skip
    train_ds, val_ds, class_names = build_datasets(cfg.data, cfg.train.seed, cache=True)
    memory_format = torch.channels_last if cfg.train.uses_channels_last(device.type) else torch.contiguous_format
    model = build_model(cfg, len(class_names)).to(device, memory_format=memory_format)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else None
    workers, pin = loader_workers(cfg.data.num_workers, device), device.type == "cuda"
    return _Run(
        cfg, model, build_loss(cfg.train.loss),
        _loader(train_ds, cfg.train.batch_size, True, workers, cfg.train.seed, pin),
        _loader(val_ds, cfg.train.batch_size, False, workers, cfg.train.seed, pin),
        val_ds, class_names, device, amp, torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda"),
        output_dir, memory_format,
    )  # fmt: skip


def _run_trial(cfg: TrialConfig, reporter: Reporter, resume_from: str | Path | None) -> dict[str, Any]:
    run = _build_run(cfg)
    state = None
    resume_path = Path(resume_from) if resume_from else reporter.resume_checkpoint()
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        load_weights(run.model, state, resume_path)
    metrics = _train_loop(run, reporter, state)  # config.yaml goes with each checkpoint of output_dir
    if run.output_dir is not None and cfg.train.viz_samples > 0:
        _write_pictures(run, run.output_dir, gradcam=False)
    return {"metrics": metrics, "class_names": run.class_names,
            "output_dir": str(run.output_dir) if run.output_dir else None}  # fmt: skip


def _maybe_inject_crash(epoch: int, point: str) -> None:
    """Fault injection for recovery tests: ``SPNTUNE_CRASH_ONCE=<marker file>:<epoch>[:<point>]`` makes
    the first trial that reaches that (1-based) epoch raise once, creating the marker so retries run
    normally. ``point``: ``start`` (default; right after the previous epoch's report) or ``report``
    (the epoch is trained and evaluated, and checkpointed in ``output_dir`` if set, but no reporter
    has heard of it)."""
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


def _train_loop(run: _Run, reporter: Reporter, state: dict[str, Any] | None) -> dict[str, Any]:
    """The epochs of every phase, from the resume point on; returns the last epoch's metrics."""
    cfg, model = run.cfg, run.model
    start_epoch = int(state["epoch"]) + 1 if state is not None else 0
    resumed = state.get("extra", {}) if state is not None else {}
    best = float(resumed.get("metrics", {}).get("best_refined_miou", -math.inf))
    # Epochs before the resume point, as recorded by the checkpoint we resume from.
    history = [row for row in resumed.get("history", []) if row.get("epoch", 0) <= start_epoch]
    metrics: dict[str, Any] = {}
    # The weights final_* scores: the best epoch's; after a resume, the resume point's until a new best
    # (a checkpoint holds its own epoch's weights only), and final_epoch says which epoch was scored.
    best_weights, best_epoch = (state["model"], start_epoch) if state is not None else (None, 0)
    for phase in _phases(cfg, model):
        if start_epoch >= phase.first_epoch + phase.epochs:
            continue  # finished before the resume point
        for p in model.parameters():
            p.requires_grad_(False)
        for p in phase.params:
            p.requires_grad_(True)
        optimiser, scheduler = _optimiser(cfg, phase.params, phase.epochs, len(run.train_loader))
        if state is not None and state.get("phase") == phase.name and state.get("optimizer"):
            load_optimiser_state(optimiser, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        with _coarse_reuse(run, phase, start_epoch, resumed) as reuse:
            for epoch in range(max(start_epoch, phase.first_epoch), phase.first_epoch + phase.epochs):
                _maybe_inject_crash(epoch, "start")
                if reuse.hit:  # a coarse epoch another trial trained: its metrics, nothing to train
                    metrics, steps_miou = reuse.replay(epoch)
                else:
                    train = _train_epoch(run, phase, optimiser, scheduler, epoch, reporter)
                    t0 = time.perf_counter()
                    results = evaluate(model, run.val_loader, len(run.class_names), run.device, run.loss_fn, run.amp,
                                       run.memory_format)  # fmt: skip
                    metrics = {"epoch": epoch + 1, "phase": phase.name, **train, **flat_metrics(results, run.class_names),
                               "val_seconds": time.perf_counter() - t0, "lr": optimiser.param_groups[0]["lr"]}  # fmt: skip
                    metrics["epoch_seconds"] = metrics["train_seconds"] + metrics["val_seconds"]
                    steps_miou = results["steps_miou"]
                is_best = not math.isnan(metrics["refined_miou"]) and metrics["refined_miou"] > best
                best = metrics["refined_miou"] if is_best else best
                metrics["best_refined_miou"] = best
                if is_best and cfg.train.final_eval:
                    best_weights = reuse.weights(epoch)
                    best_epoch = epoch + 1
                if epoch + 1 == cfg.total_epochs and cfg.train.final_eval:
                    metrics |= {**_final_scores(run, best_weights), "final_epoch": best_epoch}
                history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
                reuse.record(history[-1])
                checkpoint = _Checkpointer(run, epoch, phase.name, optimiser, scheduler, {
                    "class_names": run.class_names, "history": list(history), **reuse.checkpoint_extra(),
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})  # fmt: skip
                # Persist before reporting: a reporter may stop the trial (ASHA, interruption).
                if run.output_dir is not None:
                    checkpoint(run.output_dir, True)
                    # with the weights it describes: a run that fails before (bad data found while decoding)
                    # leaves no config.yaml, nor one beside another run's weights in the same folder
                    (run.output_dir / "config.yaml").write_text(yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
                _maybe_inject_crash(epoch, "report")
                pictures = functools.partial(_write_pictures, run)
                reporter.report(EpochReport(metrics, is_best, steps_miou, checkpoint, pictures))
    return metrics


#: In a checkpoint written while replaying cached coarse epochs: the cached rows, so a trial resumed
#: from it replays the rest of the coarse phase from the checkpoint alone (its weights are the cached ones).
_CACHED_ROWS = "coarse_cache_rows"


@dataclass
class _CoarseReuse:
    """The coarse cache as one phase of ``_train_loop`` sees it (``coarse_cache.py``).

    ``hit``: the phase's epochs are replayed from ``entry`` (nothing trained). Otherwise the phase
    trains; with ``claim`` set (a fresh two-stage coarse phase that missed, its key's lock held) its
    rows and best weights are recorded and stored as the key's entry when the phase completes.
    """

    run: _Run
    entry: CoarseEntry | None = None
    claim: CoarseClaim | None = None
    rows: list[dict[str, Any]] = dataclass_field(default_factory=list)
    best_miou: float = -math.inf
    best_state: dict[str, Tensor] | None = None
    best_epoch: int = 0

    @property
    def hit(self) -> bool:
        return self.entry is not None

    def replay(self, epoch: int) -> tuple[dict[str, Any], list[float]]:
        assert self.entry is not None
        steps = getattr(self.run.model.refiner, "iterations", 0) + 1  # h^0..h^T of *this* trial's refiner
        return replay_row(self.entry.rows[epoch], steps)

    def weights(self, epoch: int) -> dict[str, Tensor]:
        """The whole model's weights after ``epoch`` (0-based), on the CPU, for final_* scores."""
        state = _cpu_copy(self.run.model)
        if self.entry is not None:
            state |= {f"coarse.{k}": v for k, v in self.entry.weights_of(epoch + 1).items()}
        return state

    def record(self, row: dict[str, Any]) -> None:
        if self.claim is None:
            return
        # plain Python scalars: the entry loads with torch.load(weights_only=True)
        self.rows.append({k: v if type(v) in (int, float, str) else float(v)
                          for k, v in row.items() if not k.startswith("final_")})  # fmt: skip
        if row["coarse_miou"] > self.best_miou:
            self.best_miou, self.best_epoch = row["coarse_miou"], int(row["epoch"])
            self.best_state = _cpu_copy(self.run.model.coarse)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {_CACHED_ROWS: self.entry.rows} if self.entry is not None else {}

    def store(self) -> None:
        if self.claim is None:
            return
        final = _cpu_copy(self.run.model.coarse)
        best = self.best_state if self.best_epoch != len(self.rows) else None
        self.claim.store(CoarseEntry(self.rows, final, self.best_epoch, best, self.run.scaler.state_dict()))


def _cpu_copy(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@contextmanager
def _coarse_reuse(run: _Run, phase: _Phase, start_epoch: int, resumed: dict[str, Any]) -> Iterator[_CoarseReuse]:
    """The coarse cache's one hook: for a two-stage coarse phase with ``train.coarse_cache`` on and a
    ``train.coarse_cache_dir``, a hit loads the cached coarse weights and replays its epochs; a miss
    trains (holding the key's lock, so concurrent trials wait) and stores. A trial resumed mid-coarse
    replays from its checkpoint if that was a replay, else trains on without the cache; any other
    phase, and a trial resumed past the coarse phase, never touch it."""
    t = run.cfg.train
    if phase.name != "coarse" or not (t.coarse_cache and t.coarse_cache_dir):
        yield _CoarseReuse(run)
        return
    if start_epoch > 0:  # resumed: the checkpoint holds the coarse weights (cached ones if it has the rows)
        rows = resumed.get(_CACHED_ROWS)
        yield _CoarseReuse(run, CoarseEntry(rows, coarse_state={}, best_epoch=0) if rows else None)
        return
    fingerprint = data_fingerprint(run.train_loader.dataset, run.val_ds)
    train_ds = run.train_loader.dataset
    reading = {"workers": run.train_loader.num_workers,
               "train_images": f"cache {list(train_ds.images.shape[1:3])}" if isinstance(train_ds, CachedDataset) else "files"}  # fmt: skip
    fields = coarse_key_fields(run.cfg, fingerprint, run.device.type, reading)
    with CoarseCache(t.coarse_cache_dir).claim(fields) as claim:
        entry = claim.entry
        if entry is not None:
            initial = _cpu_copy(run.model.coarse)
            try:
                run.model.coarse.load_state_dict(entry.coarse_state)
            except RuntimeError as exc:  # written by a version whose coarse network differs
                run.model.coarse.load_state_dict(initial)  # a failed load may have copied some tensors
                claim.cache.discard(claim.key, f"not weights of this coarse network ({str(exc).splitlines()[0][:200]})")
                entry = None
        if entry is None:
            reuse = _CoarseReuse(run, claim=claim)
            yield reuse
            reuse.store()
            return
        if entry.scaler_state and run.scaler.is_enabled():
            run.scaler.load_state_dict(entry.scaler_state)
    yield _CoarseReuse(run, entry)


def _final_scores(run: _Run, best_weights: dict[str, Tensor] | None) -> dict[str, float]:
    """The best epoch's weights scored on the validation images at their original sizes: ``final_*``
    metrics (the numbers published results use), reported with the last epoch."""
    current = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    if best_weights is not None:
        run.model.load_state_dict(best_weights)
    transform = build_transform(run.cfg.data.image_size, train=False)
    try:
        scores = score_at_original_size(run.model, transform, run.val_ds, run.class_names, run.device)
    finally:
        run.model.load_state_dict(current)
    return {f"final_{k}": v for k, v in scores.items() if k != "infer_ms_per_image"}


@dataclass
class _Checkpointer:
    """``EpochReport.write_checkpoint`` of one epoch: ``(folder, with_optimiser) -> checkpoint file``."""

    run: _Run
    epoch: int
    phase: str
    optimiser: torch.optim.Optimizer
    scheduler: Any
    extra: dict[str, Any]

    def __call__(self, folder: Path, with_optimiser: bool) -> Path:
        path = folder / CHECKPOINT_FILE
        optimiser, scheduler = (self.optimiser, self.scheduler) if with_optimiser else (None, None)
        save_checkpoint(path, self.run.model, self.run.cfg, self.epoch, self.phase, optimiser, scheduler, self.extra)
        return path


class _LateLosses:
    """Each training batch's ``[loss, coarse, refined]``, read back to the host one batch late.

    Reading a CUDA value (``.item()``, ``bool(tensor)``) waits until the GPU has run everything queued so
    far: one read per batch leaves the GPU idle while the CPU queues the next batch's forward. Here a
    batch's losses go to the host in one non-blocking copy (into pinned memory) marked by an event, and
    the loop reads them once it has queued the next batch's step, waiting for that event only. A
    non-finite loss is then reported after one more step, naming its own batch. On the CPU the values
    are there when queued."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: tuple[int, int, Tensor, torch.cuda.Event | None] | None = None

    def push(self, batch: int, size: int, losses: Tensor) -> tuple[int, int, list[float]] | None:
        """Queue batch ``batch``'s ``losses`` (``size`` images); returns the batch before, read back
        (``(batch, size, values)``), or None for the first."""
        host = losses.detach().to("cpu", non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        previous, self.pending = self.pending, (batch, size, host, event)
        return self._read(previous)

    def flush(self) -> tuple[int, int, list[float]] | None:
        """The last batch pushed, read back (None where none is pending)."""
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(entry: tuple[int, int, Tensor, torch.cuda.Event | None] | None) -> tuple[int, int, list[float]] | None:
        if entry is None:
            return None
        batch, size, host, event = entry
        if event is not None:
            event.synchronize()
        return batch, size, host.tolist()


def _train_epoch(run: _Run, phase: _Phase, optimiser: torch.optim.Optimizer, scheduler: Any, epoch: int,
                 reporter: Reporter) -> dict[str, float]:  # fmt: skip
    """One epoch of training; returns mean losses, seconds and throughput."""
    cfg, model, device = run.cfg, run.model, run.device
    # Re-seed per epoch so a resumed trial sees the same batches as an uninterrupted one.
    seed_everything(cfg.train.seed + epoch)
    run.train_loader.generator.manual_seed(cfg.train.seed + epoch)  # type: ignore[union-attr]  # sampler's too
    model.train()
    if phase.name == "refine":
        model.coarse.eval()  # frozen: BatchNorm statistics stay as trained
    elif phase.name == "coarse":
        # The refiner is not trained yet: its BatchNorm statistics stay at their initial values, so
        # the coarse phase is the same whatever the refiner (what lets trials share it, coarse_cache.py).
        model.refiner.eval()
    t0 = time.perf_counter()
    sums = [0.0, 0.0, 0.0]  # loss, coarse, refined, each times the batch's images
    seen = 0
    zero = torch.zeros((), device=device)
    late = _LateLosses(device)

    def settle(batch: tuple[int, int, list[float]] | None) -> None:
        """Check and add up a batch's losses, read back one batch late."""
        if batch is None:
            return
        i, n, values = batch
        if not math.isfinite(values[0]):
            raise NonFiniteLossError(
                f"training loss became {values[0]} at epoch {epoch + 1}, batch {i + 1} "
                f"(phase {phase.name}, loss {cfg.train.loss!r}, optim.lr={cfg.optim.lr}); "
                "try a lower optim.lr or set optim.grad_clip"
            )
        for k, v in enumerate(values):
            sums[k] += v * n
        reporter.progress(phase.name, epoch + 1, i + 1, len(run.train_loader), values[0])

    for i, (image, target) in enumerate(_batches(run.train_loader, device, run.memory_format)):
        with torch.autocast(device_type=device.type, enabled=run.amp):
            out = model(image)
        coarse_loss = run.loss_fn(out.coarse_logits.float(), target) if phase.coarse_weight else zero
        refined_loss = run.loss_fn(out.refined_logits.float(), target) if phase.refined_weight else zero
        loss = phase.coarse_weight * coarse_loss + phase.refined_weight * refined_loss
        optimiser.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.optim.grad_clip is not None:
            run.scaler.unscale_(optimiser)
            torch.nn.utils.clip_grad_norm_(phase.params, cfg.optim.grad_clip)
        run.scaler.step(optimiser)
        run.scaler.update()
        scheduler.step()
        seen += image.shape[0]
        settle(late.push(i, image.shape[0], torch.stack([loss, coarse_loss, refined_loss])))
    settle(late.flush())
    seconds = time.perf_counter() - t0
    return {
        "train_loss": sums[0] / max(seen, 1),
        "train_loss_coarse": sums[1] / max(seen, 1),
        "train_loss_refined": sums[2] / max(seen, 1),
        "train_seconds": seconds,
        "train_images_per_s": seen / max(seconds, 1e-9),
    }


def _write_pictures(run: _Run, folder: Path, gradcam: bool) -> list[Path]:
    """Mask panels, h^0..h^T strips (and Grad-CAM) of the first ``train.viz_samples`` validation images."""
    if run.cfg.train.viz_samples <= 0:
        return []
    pictures = trial_pictures(run.model, run.val_ds, run.class_names, run.cfg.train.viz_samples, run.device, gradcam)
    return save_pictures(pictures, folder)
