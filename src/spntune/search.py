"""``spntune search``: Ray Tune runs the trials, Optuna (TPE) proposes them.

One trial = ``train_segmentation`` behind a Ray reporter. The driver validates the space,
starts or joins Ray, runs a ``Tuner`` with ``OptunaSearch`` + ASHA, prints a concise live table
and a leaderboard, and writes ``leaderboard.csv`` next to Ray's results. ``--resume`` continues
an interrupted search from its storage folder (searcher state included).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from spntune.cli import format_metric as _fmt
from spntune.config import ConfigError, TrialConfig, describe_pipeline
from spntune.space import SearchSpace
from spntune.tracking import SearchRun, default_tracking_uri, finish_trial_run
from spntune.trainables import HISTORY_FILE, Reporter, read_history, train_segmentation

__all__ = ["OBJECTIVES", "RayReporter", "SearchOptions", "SearchSummary", "TrialRow", "run_search", "run_trial"]

#: Objective names -> (metric, mode). ``latency`` is measured inference ms per image.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "miou": ("refined_miou", "max"),
    "latency": ("infer_ms_per_image", "min"),
}


class RayReporter(Reporter):
    """Reports to Ray Tune with a checkpoint every epoch; resumes from Ray's checkpoint."""

    wants_checkpoints = True

    def __init__(self) -> None:
        import ray

        self._node_id = ray.get_runtime_context().get_node_id()
        self._restored: tempfile.TemporaryDirectory[str] | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report({**metrics, "node_id": self._node_id}, checkpoint=checkpoint)  # copies it to storage

    def trial_id(self) -> str | None:
        return tune.get_context().get_trial_id()

    def resume_checkpoint(self) -> Path | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="spntune-restore-")
        return Path(checkpoint.to_directory(self._restored.name))


def run_trial(config: dict[str, Any], space: SearchSpace, overrides: dict[str, Any]) -> None:
    """Ray Tune function trainable: Optuna's suggestions -> trial config -> train."""
    trial_config = {**space.to_trial_config(config), **overrides}
    train_segmentation(trial_config, RayReporter())


@dataclass
class SearchOptions:
    space: SearchSpace
    trials: int = 8
    concurrency: int = 2
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    metric: str | None = None  # default: the space's metric
    objectives: list[str] = field(default_factory=lambda: ["miou"])
    address: str | None = None
    name: str = "search"
    storage: Path = Path("runs/ray")
    resume: bool = False
    max_failures: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    top: int = 10
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or ./mlflow_runs; "none": no MLflow
    experiment: str = "spntune"
    viz: bool = True
    space_file: Path | None = None


@dataclass
class TrialRow:
    trial_id: str
    status: str  # completed | stopped (ASHA) | error
    summary: str
    epochs: int
    best: float
    last: dict[str, Any]
    path: str
    error: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # Optuna names, as suggested
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics, from the checkpoint


@dataclass
class SearchSummary:
    rows: list[TrialRow]
    experiment_path: Path
    metric: str
    seconds: float
    pareto: list[TrialRow] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def errored(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == "error"]


def _preflight(space: SearchSpace, overrides: dict[str, Any]) -> None:
    """Fail before Ray starts: overrides must validate and a dataset root must exist."""
    base = {**space.to_trial_config({}), **overrides}
    cfg = TrialConfig.from_dict(base)
    if cfg.data.root and not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data.root {cfg.data.root!r} is not a directory (set it with --set data.root=PATH)")


class _Progress:
    """Concise trial table for the terminal, replacing Ray's default output."""

    def __init__(self, space: SearchSpace, metric: str, on_trial_end: Any = None) -> None:
        from spntune.cli import make_console

        self.on_trial_end = on_trial_end  # (trial, errored: bool) -> None: closes the MLflow run
        self.space = space
        self.metric = metric
        self.console = make_console()
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Any = None

    def callback(self) -> ProgressCallback:
        return ProgressCallback(self)

    def update(self, trial: Any, status: str, result: dict | None = None) -> None:
        row = self.rows.get(trial.trial_id)
        if row is None:  # first sight of the trial: describe it once
            try:
                summary = describe_pipeline(self.space.to_trial_config(trial.config))
            except ConfigError:
                summary = str(trial.config)
            row = self.rows[trial.trial_id] = {"epoch": 0, "metric": math.nan, "summary": summary}
        row["status"] = status
        if result is not None and "epoch" in result:
            row["epoch"] = result["epoch"]
            row["metric"] = result.get(self.metric, math.nan)
        if self.live is not None:
            self.live.update(self.table())
        elif result is None:
            self.console.print(f"trial {trial.trial_id} {status:<8} {row['summary']}")
        else:
            self.console.print(f"trial {trial.trial_id} epoch {row['epoch']} {self.metric} {row['metric']:.4f}")

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"trials ({self.metric})", expand=False)
        for col in ("trial", "pipeline", "epoch", self.metric, "status"):
            table.add_column(col)
        for tid, row in self.rows.items():
            table.add_row(tid, row.get("summary", ""), str(row["epoch"]), _fmt(row["metric"]), row["status"])
        return table

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)


class ProgressCallback(tune.Callback):
    """Feeds ``_Progress`` from the driver. Pickles to a no-op (Ray stores the run config)."""

    def __init__(self, progress: _Progress | None) -> None:
        self.progress = progress

    def __getstate__(self) -> dict[str, Any]:
        return {"progress": None}

    def _update(self, trial: Any, status: str, result: dict | None = None) -> None:
        if self.progress is not None:
            self.progress.update(trial, status, result)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trial, "running", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "done")
        if self.progress is not None and self.progress.on_trial_end is not None:
            self.progress.on_trial_end(trial, False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "ERROR")
        if self.progress is not None and self.progress.on_trial_end is not None:
            self.progress.on_trial_end(trial, True)


def _drop_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # legacy engine: verbose=0 is silent, our table shows progress
    if ray.is_initialized():
        return
    if not address:
        # A Ray started here uses token authentication (Ray's default for local clusters since 2.60;
        # the token lives in ~/.ray/auth_token). Ray says so in a warning on every start that the user
        # cannot act on, so that one message is dropped; the README explains it once.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_drop_token_notice)
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


def run_search(opts: SearchOptions) -> SearchSummary:
    """Run (or resume) a search and return its leaderboard rows."""
    import optuna
    import ray
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = opts.space
    unknown = [o for o in opts.objectives if o not in OBJECTIVES]
    if unknown or not opts.objectives:
        raise ConfigError(f"--objective takes {', '.join(OBJECTIVES)} joined by ',', got {','.join(opts.objectives)}")
    metric = opts.metric or space.metric
    mode = space.mode if metric == space.metric else "max"
    objectives = [(metric, mode) if o == "miou" else OBJECTIVES[o] for o in opts.objectives]  # (metric, mode)
    _preflight(space, opts.overrides)
    storage = opts.storage.resolve()
    experiment = storage / opts.name
    if opts.resume and not experiment.is_dir():
        raise ConfigError(f"nothing to resume: no search at {experiment}")
    if not opts.resume and experiment.exists():
        raise ConfigError(
            f"a search named {opts.name!r} already exists at {experiment}; use --resume or another --name"
        )

    start = time.perf_counter()
    overrides = dict(opts.overrides)
    uri = None if (opts.tracking_uri or "").lower() == "none" else (opts.tracking_uri or default_tracking_uri())
    parent = None
    if uri:
        search_params = {"space": space.name, "trials": opts.trials, "concurrency": opts.concurrency,
                         "scheduler": opts.scheduler, "metric": metric, "objectives": ",".join(opts.objectives),
                         "gpus_per_trial": opts.gpus_per_trial, "cpus_per_trial": opts.cpus_per_trial,
                         "overrides": overrides}  # fmt: skip
        parent = SearchRun.open(
            uri, opts.experiment, opts.name, experiment, search_params, opts.space_file, opts.resume
        )
        if parent is not None:  # the URI travels in the config: Ray workers do not inherit the environment
            overrides |= {"tracking.uri": uri, "tracking.experiment": opts.experiment, "tracking.parent_run_id": parent.run_id,
                          "tracking.search_name": opts.name, "tracking.viz": opts.viz}  # fmt: skip
    _init_ray(opts.address)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, overrides=overrides),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )

    def close_run(trial: Any, errored: bool) -> None:
        if parent is None:
            return
        epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
        status = _status(errored, epochs, _expected_epochs(_trial_config(space, trial.config, overrides)))
        _close_trial_run(uri, opts.experiment, parent.run_id, trial.trial_id, status, epochs)  # type: ignore[arg-type]

    progress = _Progress(space, metric, close_run)
    run_config = tune.RunConfig(
        name=opts.name,
        storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=0,
        callbacks=[progress.callback()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multivariate/group TPE
        if opts.resume:
            # Restores the searcher (Optuna study) too; finished trials are not re-run.
            tuner = tune.Tuner.restore(
                str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=False
            )
        else:
            metrics = [m for m, _ in objectives]
            modes = [mo for _, mo in objectives]
            sampler = optuna.samplers.TPESampler(
                multivariate=True, group=True, constant_liar=True, seed=opts.seed, n_startup_trials=min(10, opts.trials)
            )
            searcher = OptunaSearch(
                space=space.define_by_run,
                metric=metrics if len(metrics) > 1 else metrics[0],
                mode=modes if len(modes) > 1 else modes[0],
                sampler=sampler,
                points_to_evaluate=space.points_to_evaluate or None,
            )
            if opts.scheduler == "asha":
                scheduler: Any = ASHAScheduler(
                    time_attr="training_iteration", metric=metric, mode=mode, max_t=1000,
                    grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
                )  # fmt: skip
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=opts.trials,
                    max_concurrent_trials=opts.concurrency,
                    # A fresh actor re-imports torch + smp (~5 s here); the trainable is a pure
                    # function of its config (it reseeds itself), so actors can be reused safely.
                    reuse_actors=True,
                ),
                run_config=run_config,
            )
        with progress:
            results = tuner.fit()
    rows = _rows(results, space, metric, mode, overrides)
    summary = SearchSummary(rows, experiment, metric, time.perf_counter() - start)
    if len(opts.objectives) > 1:
        summary.pareto = _pareto(rows, objectives)
    write_leaderboard(summary, experiment / "leaderboard.csv")
    write_history(rows, experiment / "history.csv")
    if parent is not None and uri is not None:
        _finish_tracking(parent, uri, opts.experiment, space, summary, mode)
    if not opts.address:
        ray.shutdown()
    return summary


def _finish_tracking(
    parent: SearchRun, uri: str, experiment_name: str, space: SearchSpace, summary: SearchSummary, mode: str
) -> None:
    """Final sweep (every child run gets its final status, also for trials of a resumed search), then
    the parent run's leaderboard, plots and best-trial tag."""
    for row in summary.rows:
        _close_trial_run(uri, experiment_name, parent.run_id, row.trial_id, row.status, row.epochs, row.error)
    experiment = summary.experiment_path
    files = {"leaderboard": write_leaderboard_html(summary, experiment / "leaderboard.html"),
             "leaderboard/history": experiment / "history.csv"}  # fmt: skip
    files |= {f"plots/{p.stem}": p for p in search_plots(space, summary.rows, mode, experiment / "plots")}
    best = next((r for r in summary.rows if r.status != "error" and not math.isnan(r.best)), None)
    parent.finish(experiment / "leaderboard.csv", files, best.trial_id if best else None)
    summary.parent_run_id, summary.tracking_uri = parent.run_id, uri


def _trial_config(space: SearchSpace, suggested: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The flat config a trial ran with (tracking settings left out)."""
    return {**space.to_trial_config(suggested), **{k: v for k, v in overrides.items() if not k.startswith("tracking.")}}


def _expected_epochs(config: dict[str, Any]) -> int:
    try:
        return TrialConfig.from_dict(config).total_epochs
    except ConfigError:
        return -1


def _status(errored: bool, epochs: int, expected: int) -> str:
    """Leaderboard status: ``error``, ``completed`` (all epochs ran) or ``stopped`` (early, by ASHA)."""
    if errored:
        return "error"
    return "completed" if epochs >= expected else "stopped"


_MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}


def _close_trial_run(
    uri: str, experiment: str, parent_run_id: str, trial_id: str, status: str, epochs: int, error: str = ""
) -> None:
    """Give a trial's MLflow run the final status matching its leaderboard ``status``, with the reason."""
    reason = {
        "error": error or "trial raised; see the Ray error file in the trial folder",
        "stopped": f"stopped early by the scheduler after epoch {epochs}",
    }.get(status, "")
    finish_trial_run(uri, experiment, parent_run_id, trial_id, _MLFLOW_STATUS[status], reason)


def _checkpoint_history(checkpoint: Any) -> list[dict[str, Any]]:
    """The per-epoch history stored beside a trial's latest checkpoint (local or remote storage)."""
    if checkpoint is None:
        return []
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HISTORY_FILE}") as fh:
            return read_history(fh.read().decode())
    except OSError:  # a checkpoint from before histories existed
        return []


def _rows(results: Any, space: SearchSpace, metric: str, mode: str, overrides: dict[str, Any]) -> list[TrialRow]:
    """One row per trial. Epochs, best and last metrics come from the history that travels with the
    trial's latest checkpoint (every report carries one), not from Ray's ``result.json``, which can
    lose epochs when a trial is retried."""
    rows = []
    for result in results:
        config = _trial_config(space, result.config or {}, overrides)
        reported = dict(result.metrics or {})
        history = _checkpoint_history(result.checkpoint)
        last = dict(history[-1]) if history else reported
        values = [float(h[metric]) for h in history if isinstance(h.get(metric), (int, float))]
        values = [v for v in values if not math.isnan(v)]
        best = (max(values) if mode == "max" else min(values)) if values else math.nan
        epochs = int(last.get("epoch", 0) or 0)
        status = _status(result.error is not None, epochs, _expected_epochs(config))
        error = _first_line(result.error) if result.error is not None else ""
        trial_id = reported.get("trial_id") or Path(result.path).name
        rows.append(
            TrialRow(
                str(trial_id),
                status,
                describe_pipeline(config),
                epochs,
                best,
                last,
                str(result.path),
                error,
                config,
                dict(result.config or {}),
                history,
            )
        )
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (math.isnan(r.best), sign * (0 if math.isnan(r.best) else r.best)))
    return rows


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # Ray wraps the trial's exception; keep its last "Error: message" line.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line[:500]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _pareto(rows: list[TrialRow], objectives: list[tuple[str, str]]) -> list[TrialRow]:
    def vec(r: TrialRow) -> list[float]:
        return [(r.last.get(m, math.nan) if mo == "min" else -r.last.get(m, math.nan)) for m, mo in objectives]

    ok = [r for r in rows if r.status != "error" and not any(math.isnan(v) for v in vec(r))]
    front = []
    for r in ok:
        dominated = any(all(a <= b for a, b in zip(vec(o), vec(r))) and vec(o) != vec(r) for o in ok)
        if not dominated:
            front.append(r)
    return front


def write_leaderboard(summary: SearchSummary, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [
        "coarse_miou",
        "refined_miou",
        "refined_miou_gain",
        "refined_boundary_iou",
        "infer_ms_per_image",
        "epoch_seconds",
    ]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["rank", "trial_id", "status", f"best_{summary.metric}", "epochs", *keys, "pipeline", "path", "error"]
        )
        for i, r in enumerate(summary.rows, 1):
            writer.writerow(
                [
                    i,
                    r.trial_id,
                    r.status,
                    r.best,
                    r.epochs,
                    *(r.last.get(k, "") for k in keys),
                    r.summary,
                    r.path,
                    r.error,
                ]
            )


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


def _leaderboard_table(summary: SearchSummary, rows: list[TrialRow]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the terminal table and the HTML artifact."""
    header = [
        "#",
        "trial",
        "pipeline",
        "epochs",
        f"best {summary.metric}",
        "coarse mIoU",
        "gain",
        "boundary IoU",
        "status",
    ]
    body = [
        [str(i), r.trial_id, r.summary, str(r.epochs), _fmt(r.best), _fmt(r.last.get("coarse_miou")),
         _fmt(r.last.get("refined_miou_gain")), _fmt(r.last.get("refined_boundary_iou")), r.status]
        for i, r in enumerate(rows, 1)
    ]  # fmt: skip
    return header, body


def write_leaderboard_html(summary: SearchSummary, path: Path) -> Path:
    import html

    header, body = _leaderboard_table(summary, summary.rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*header, "error"])
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in [*row, r.error]) + "</tr>"
        for row, r in zip(body, summary.rows, strict=True)
    )
    path.write_text(f"<html><body><table border=1 cellpadding=4><tr>{head}</tr>{cells}</table></body></html>\n")
    return path


def search_plots(space: SearchSpace, rows: list[TrialRow], mode: str, out_dir: Path) -> list[Path]:
    """Optuna parameter importance (fANOVA over the unconditional parameters) and a parallel-coordinates
    plot of the trials, as PNGs. Needs at least two finished trials; returns what it wrote."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [r for r in rows if r.status != "error" and not math.isnan(r.best)]
    if len(done) < 2:
        return []
    distributions = {name: _distribution(space, name) for name in space.optuna_to_config_key()}
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for r in done:
        params = {k: v for k, v in r.params.items() if k in distributions}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params}, value=r.best)
        )
    varying = [k for k in space.params if len({str(r.params.get(k)) for r in done}) > 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in (("param_importances.png", optuna.visualization.matplotlib.plot_param_importances),
                           ("parallel_coordinates.png", optuna.visualization.matplotlib.plot_parallel_coordinate)):  # fmt: skip
            if not varying:
                break
            try:
                ax = plot(study, params=varying)
                fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
                fig.set_size_inches(10, 6)
                fig.tight_layout()
                fig.savefig(out_dir / name, dpi=100)
                plt.close(fig)
                written.append(out_dir / name)
            except Exception as exc:  # too few or constant trials: skip the plot, keep the search result
                logging.getLogger("spntune.search").warning("could not draw %s: %s", name, exc)
    return written


def _distribution(space: SearchSpace, name: str) -> Any:
    import optuna.distributions as d

    key = space.optuna_to_config_key()[name]
    param = space.params.get(name)
    if param is None:
        value = name.split(".", 1)[0]
        param = next(
            p
            for branches in space.when.values()
            for v, ps in branches.items()
            if v == value
            for k, p in ps.items()
            if k == key
        )
    if param.kind == "choice":
        return d.CategoricalDistribution(param.choice)
    if param.kind == "int":
        low, high = param.int_range  # type: ignore[misc]
        return d.IntDistribution(low, high, step=int(param.step or 1), log=param.log)
    if param.kind == "float":
        low, high = param.float_range  # type: ignore[misc]
        return d.FloatDistribution(low, high, step=param.step, log=param.log)
    return d.CategoricalDistribution([param.value])


def print_summary(summary: SearchSummary, top: int) -> None:
    from rich.table import Table

    from spntune.cli import make_console

    console = make_console()
    table = Table(title=f"leaderboard: best {summary.metric} per trial")
    header, body = _leaderboard_table(summary, summary.rows[:top])
    for col in header:
        table.add_column(col)
    for row in body:
        table.add_row(*row)
    console.print(table)
    counts = {s: sum(r.status == s for r in summary.rows) for s in ("completed", "stopped", "error")}
    console.print(
        f"{len(summary.rows)} trials in {summary.seconds:.0f} s: {counts['completed']} completed, "
        f"{counts['stopped']} stopped early (ASHA), {counts['error']} errored"
    )
    for r in summary.errored:
        console.print(f"  [red]errored[/red] {r.trial_id} ({r.summary}): {r.error}")
    if summary.pareto:
        console.print("Pareto set (refined mIoU vs latency): " + ", ".join(
            f"{r.trial_id} ({_fmt(r.last.get('refined_miou'))}, {r.last.get('infer_ms_per_image', math.nan):.1f} ms)" for r in summary.pareto
        ))  # fmt: skip
    console.print(
        f"results: {summary.experiment_path} (leaderboard.csv, history.csv = every trial's epochs; "
        "each trial's folder holds its checkpoints)"
    )
    if summary.parent_run_id:
        console.print(f"MLflow: search run {summary.parent_run_id} at {summary.tracking_uri}")
        console.print("browse it: spntune ui   (then open http://127.0.0.1:5000, view 'Model training')")
