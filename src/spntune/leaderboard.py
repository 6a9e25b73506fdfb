"""The leaderboard of a search: one row per trial, ranked, as a terminal table, CSV, HTML and plots.

``spntune search`` builds its rows from Ray's results (``tune.py``), ``spntune best`` from MLflow
(``tracking.py``); both rank and render them here. Rows carry each trial's per-epoch history
(``history.csv``), read from its checkpoint, so they stay whole after retries and resumes.
"""

from __future__ import annotations

import csv
import html
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spntune.config import ConfigError, TrialConfig
from spntune.space import SearchSpace
from spntune.status import TrialStatus

__all__ = [
    "LEADERBOARD_METRICS",
    "TRIAL_METRICS",
    "SearchSummary",
    "TrialRow",
    "best_of",
    "class_key",
    "expected_epochs",
    "format_metric",
    "is_trial_metric",
    "leaderboard_table",
    "metric_mode",
    "pareto",
    "rank",
    "search_plots",
    "write_history",
    "write_leaderboard",
    "write_leaderboard_html",
]

log = logging.getLogger("spntune.leaderboard")

#: Last-epoch metrics every leaderboard shows besides the best value of the search's metric.
LEADERBOARD_METRICS = (
    "final_coarse_miou",
    "final_refined_miou",
    "final_refined_boundary_iou",
    "coarse_miou",
    "refined_miou",
    "refined_miou_gain",
    "refined_boundary_iou",
    "infer_ms_per_image",
    "epoch_seconds",
)


#: Metrics every trial reports each epoch, besides per-class IoU (``coarse_iou_<class>``,
#: ``refined_iou_<class>``) and refined mIoU after each propagation step (``refined_miou_t<t>``).
TRIAL_METRICS = (
    *(f"{stream}_{m}" for stream in ("coarse", "refined") for m in ("miou", "pixel_acc", "mean_dice", "boundary_iou")),
    "refined_miou_gain", "best_refined_miou", "train_loss", "train_loss_coarse", "train_loss_refined", "val_loss",
    "infer_ms_per_image", "train_seconds", "val_seconds", "epoch_seconds", "train_images_per_s", "lr",
)  # fmt: skip
_PER_CLASS_OR_STEP = re.compile(r"(coarse|refined)_iou_\w+|refined_miou_t\d+")
_LOWER_IS_BETTER = re.compile(r".*(loss.*|_seconds|_ms_per_image)")


def is_trial_metric(name: str) -> bool:
    """Whether trials report a metric of this name (what a search can optimise). ``final_<metric>``:
    the best epoch scored at original size, reported with the last epoch (``final_epoch``, ``final_images``)."""
    if name in ("final_epoch", "final_images"):
        return True
    name = name.removeprefix("final_")
    return name in TRIAL_METRICS or _PER_CLASS_OR_STEP.fullmatch(name) is not None


def metric_mode(name: str) -> str:
    """``min`` for losses and times, ``max`` for scores."""
    return "min" if _LOWER_IS_BETTER.fullmatch(name) else "max"


@dataclass
class TrialRow:
    trial_id: str
    status: TrialStatus
    summary: str  # describe_pipeline of the trial's config
    epochs: int
    best: float  # best value of the search's metric over the trial's epochs
    last: dict[str, Any]  # the last epoch's metrics
    path: str = ""  # the trial's folder (Ray) or MLflow run
    error: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # flat trial config
    params: dict[str, Any] = field(default_factory=dict)  # Optuna names, as suggested
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics
    run_id: str = ""  # MLflow run, when known


@dataclass
class SearchSummary:
    rows: list[TrialRow]
    experiment_path: Path
    metric: str
    seconds: float
    pareto: list[TrialRow] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    tracking_notes: list[str] = field(default_factory=list)  # what MLflow got late, or lacks
    interrupted: bool = False  # Ctrl-C: `--resume` continues the search
    trials_asked: int = 0
    repeats_skipped: int | None = None  # proposals of configurations that had run, not run again (distinct.py)
    space_exhausted: bool = False  # the search ended early: the searcher proposed only configurations that ran

    @property
    def errored(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status is TrialStatus.ERROR]

    def counts(self) -> dict[TrialStatus, int]:
        return {s: sum(r.status is s for r in self.rows) for s in TrialStatus}


def class_key(name: str) -> str:
    """A class name as it appears in metric names: ``coarse_iou_<key>``, ``refined_iou_<key>``."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "class"


def format_metric(v: Any) -> str:
    """A metric to 4 decimals; ``-`` for missing, NaN or non-numeric values."""
    return "-" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.4f}"


def expected_epochs(config: dict[str, Any]) -> int:
    """Epochs a trial with this flat config runs (-1 if the config does not validate)."""
    try:
        return TrialConfig.from_dict(config).total_epochs
    except ConfigError:
        return -1


def best_of(values: list[Any], mode: str) -> float:
    """Best finite value (``max`` or ``min``) of a metric's history; NaN when there is none."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return (max(finite) if mode == "max" else min(finite)) if finite else math.nan


def rank(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best first; trials without a value last."""
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (math.isnan(r.best), sign * (0 if math.isnan(r.best) else r.best)))


def pareto(rows: list[TrialRow], objectives: list[tuple[str, str]]) -> list[TrialRow]:
    """Trials no other finished trial beats on every objective ``(metric, mode)`` (last epoch)."""

    def vec(r: TrialRow) -> list[float]:
        return [(r.last.get(m, math.nan) if mo == "min" else -r.last.get(m, math.nan)) for m, mo in objectives]

    ok = [r for r in rows if r.status is not TrialStatus.ERROR and not any(math.isnan(v) for v in vec(r))]
    return [r for r in ok if not any(all(a <= b for a, b in zip(vec(o), vec(r))) and vec(o) != vec(r) for o in ok)]


def write_leaderboard(summary: SearchSummary, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "trial_id", "status", f"best_{summary.metric}", "epochs", *LEADERBOARD_METRICS,
                         "pipeline", "path", "error"])  # fmt: skip
        for i, r in enumerate(summary.rows, 1):
            writer.writerow([i, r.trial_id, r.status.value, r.best, r.epochs,
                             *(r.last.get(k, "") for k in LEADERBOARD_METRICS), r.summary, r.path, r.error])  # fmt: skip


def write_history(rows: list[TrialRow], path: Path) -> None:
    """Every trial's per-epoch metrics, one row per (trial, epoch), in leaderboard order."""
    keys: dict[str, None] = {}
    for r in rows:
        for h in r.history:
            keys |= dict.fromkeys(k for k in h if k != "epoch")
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial_id", "epoch", *keys])
        for r in rows:
            for h in r.history:
                writer.writerow([r.trial_id, h.get("epoch", ""), *(h.get(k, "") for k in keys)])


def leaderboard_table(metric: str, rows: list[TrialRow]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the terminal tables (search and best) and the HTML artifact."""
    with_runs = any(r.run_id for r in rows)
    header = ["#", *(["run id"] if with_runs else []), "trial", "pipeline", "epochs", f"best {metric}",
              "coarse mIoU", "gain", "boundary IoU", "final mIoU", "status"]  # fmt: skip
    body = [
        [str(i), *([r.run_id] if with_runs else []), r.trial_id, r.summary, str(r.epochs), format_metric(r.best),
         format_metric(r.last.get("coarse_miou")), format_metric(r.last.get("refined_miou_gain")),
         format_metric(r.last.get("refined_boundary_iou")), format_metric(r.last.get("final_refined_miou")),
         r.status.value]
        for i, r in enumerate(rows, 1)
    ]  # fmt: skip
    return header, body


def write_leaderboard_html(summary: SearchSummary, path: Path) -> Path:
    header, body = leaderboard_table(summary.metric, summary.rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*header, "error"])
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in [*row, r.error]) + "</tr>"
        for row, r in zip(body, summary.rows, strict=True)
    )
    path.write_text(f"<html><body><table border=1 cellpadding=4><tr>{head}</tr>{cells}</table></body></html>\n")
    return path


def search_plots(space: SearchSpace, rows: list[TrialRow], mode: str, out_dir: Path) -> list[Path]:
    """Optuna parameter importance (fANOVA over the unconditional parameters) and a parallel-coordinates
    plot of the trials, as PNGs. Needs at least two finished trials; returns what it wrote.

    matplotlib and optuna are imported here: only the end of a search needs them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [r for r in rows if r.status is not TrialStatus.ERROR and not math.isnan(r.best)]
    if len(done) < 2:
        return []
    distributions = space.distributions()
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for r in done:
        params = {k: v for k, v in r.params.items() if k in distributions}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params}, value=r.best)
        )
    varying = [k for k in space.params if len({str(r.params.get(k)) for r in done}) > 1]
    if not varying:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    plots = {"param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
             "parallel_coordinates.png": optuna.visualization.matplotlib.plot_parallel_coordinate}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                ax = plot(study, params=varying)
                fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
                fig.set_size_inches(10, 6)
                fig.tight_layout()
                fig.savefig(out_dir / name, dpi=100)
                plt.close(fig)
                written.append(out_dir / name)
            except Exception as exc:  # too few or constant trials: skip the plot, keep the search result
                log.warning("could not draw %s: %s", name, exc)
    return written
