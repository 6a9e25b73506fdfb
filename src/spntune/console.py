"""All terminal output: the progress of `spntune train`, the live trial table of `spntune search`,
and the leaderboards of `spntune search` and `spntune best`."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spntune.config import TrialConfig, describe_pipeline
from spntune.leaderboard import SearchSummary, TrialRow, class_key, format_metric, leaderboard_table
from spntune.reporting import EpochReport, Reporter
from spntune.status import TrialStatus
from spntune.tracking import default_tracking_uri, masked

__all__ = [
    "ConsoleReporter",
    "LiveTable",
    "how_to_browse",
    "make_console",
    "print_best",
    "print_results",
    "print_resume",
    "print_search_summary",
    "print_ui_banner",
    "print_ui_stopped",
    "print_written",
]

_fmt = format_metric


def make_console() -> Console:
    """Rich console; wide when output is piped or logged so tables keep their columns."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


class ConsoleReporter(Reporter):
    """`spntune train`: a progress bar over batches plus one line per epoch."""

    def __init__(self, console: Console, total_epochs: int) -> None:
        self.console = console
        self.total_epochs = total_epochs
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console, transient=True,
        )  # fmt: skip
        self.task: Any = None

    def announce(self, cfg: TrialConfig) -> None:
        """One line on what is about to train and where it goes."""
        self.console.print(
            f"[bold]spntune train[/bold]: {cfg.data.name} {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, "
            f"{cfg.model.arch}/{cfg.model.encoder} + {cfg.refiner.kind}, {cfg.train.stage}, "
            f"{cfg.total_epochs} epochs -> {cfg.output_dir}"
        )

    def progress(self, stage: str, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        desc = f"epoch {epoch}/{self.total_epochs} \\[{stage}]"
        if self.task is None or batch == 1:
            if self.task is not None:
                self.bar.remove_task(self.task)
            else:
                self.bar.start()
            self.task = self.bar.add_task(desc, total=num_batches, loss=loss)
        self.bar.update(self.task, completed=batch, loss=loss)

    def report(self, epoch: EpochReport) -> None:
        m = epoch.metrics
        self.console.print(
            f"epoch {m['epoch']:>3} \\[{m['phase']}] loss {m['train_loss']:.4f}  "
            f"mIoU coarse {_fmt(m['coarse_miou'])} refined {_fmt(m['refined_miou'])}  "
            f"bIoU coarse {_fmt(m['coarse_boundary_iou'])} refined {_fmt(m['refined_boundary_iou'])}  "
            f"{m['epoch_seconds']:.1f}s"
        )

    def end(self, status: TrialStatus, reason: str = "") -> None:
        if self.task is not None:
            self.bar.stop()
            self.task = None


def print_results(console: Console, metrics: dict[str, Any], class_names: list[str], title: str = "") -> None:
    """Coarse vs refined, per class, and mIoU after each propagation step (`spntune train`'s final
    table, `spntune evaluate`'s report)."""
    table = Table(title=title or f"final metrics (epoch {metrics['epoch']})")
    table.add_column("metric")
    table.add_column("coarse", justify="right")
    table.add_column("refined", justify="right")
    table.add_column("gain", justify="right")
    rows = [("mIoU", "miou"), ("boundary IoU", "boundary_iou"), ("pixel acc", "pixel_acc"), ("mean Dice", "mean_dice")]
    rows += [(f"IoU {n}", f"iou_{class_key(n)}") for n in class_names]
    for label, key in rows:
        c, r = metrics[f"coarse_{key}"], metrics[f"refined_{key}"]
        gain = r - c if not (math.isnan(c) or math.isnan(r)) else math.nan
        table.add_row(label, _fmt(c), _fmt(r), ("+" if gain > 0 else "") + _fmt(gain))
    console.print(table)
    steps = [
        metrics[k] for k in sorted((k for k in metrics if k.startswith("refined_miou_t")), key=lambda k: int(k[14:]))
    ]
    if len(steps) > 1:
        console.print("refined mIoU by propagation step: " + "  ".join(f"t{t}={_fmt(v)}" for t, v in enumerate(steps)))
    if "train_images_per_s" in metrics:
        console.print(f"{metrics['train_images_per_s']:.1f} train images/s, {metrics['epoch_seconds']:.1f} s/epoch")


class LiveTable:
    """`spntune search`'s view of its trials (a ``tune.TrialListener``): a live table on a terminal,
    one line per event when the output is piped."""

    def __init__(self, metric: str, console: Console | None = None) -> None:
        self.metric = metric
        self.console = console or make_console()
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: Live | None = None

    def trial_event(
        self, trial_id: str, config: dict[str, Any], status: TrialStatus, result: dict[str, Any] | None
    ) -> None:
        row = self.rows.get(trial_id)
        if row is None:  # first sight of the trial: describe it once
            row = self.rows[trial_id] = {"epoch": 0, "metric": math.nan, "summary": describe_pipeline(config)}
        row["status"] = status
        if result is not None and "epoch" in result:
            row["epoch"] = result["epoch"]
            row["metric"] = result.get(self.metric, math.nan)
        if self.live is not None:
            self.live.update(self.table())
        elif result is None:
            self.console.print(f"trial {trial_id} {status.value:<9} {row['summary']}")
        else:
            self.console.print(f"trial {trial_id} epoch {row['epoch']} {self.metric} {_fmt(row['metric'])}")

    def table(self) -> Table:
        table = Table(title=f"trials ({self.metric})", expand=False)
        for col in ("trial", "pipeline", "epoch", self.metric, "status"):
            table.add_column(col)
        for tid, row in self.rows.items():
            table.add_row(tid, row["summary"], str(row["epoch"]), _fmt(row["metric"]), row["status"].value)
        return table

    def __enter__(self) -> LiveTable:
        if self.console.is_terminal:
            self.live = Live(self.table(), console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None


def _print_leaderboard(console: Console, title: str, metric: str, rows: list[TrialRow]) -> None:
    table = Table(title=title)
    header, body = leaderboard_table(metric, rows)
    for col in header:
        table.add_column(col)
    for row in body:
        table.add_row(*row)
    console.print(table)


def print_search_summary(summary: SearchSummary, top: int, console: Console | None = None) -> None:
    """`spntune search`'s closing output: leaderboard, counts, errors, Pareto set, where things are."""
    console = console or make_console()
    _print_leaderboard(console, f"leaderboard: best {summary.metric} per trial", summary.metric, summary.rows[:top])
    counts = summary.counts()
    console.print(
        f"{len(summary.rows)} trials in {summary.seconds:.0f} s: {counts[TrialStatus.COMPLETED]} completed, "
        + (f"{counts[TrialStatus.STOPPED]} stopped early (ASHA), " if counts[TrialStatus.STOPPED] else "")
        + f"{counts[TrialStatus.ERROR]} errored"
        + (f", {counts[TrialStatus.INTERRUPTED]} interrupted" if counts[TrialStatus.INTERRUPTED] else "")
    )
    if summary.repeats_skipped:
        console.print(
            f"{summary.repeats_skipped} proposed configurations had run already in this search: not trained again"
            + (f"; the search ended after {len(summary.rows)} of {summary.trials_asked} trials, having run every "
               "configuration the searcher still proposed" if summary.space_exhausted else ""),
            soft_wrap=True,
        )  # fmt: skip
    if summary.interrupted:
        console.print(
            f"[yellow]interrupted[/yellow]: {len(summary.rows)} of {summary.trials_asked} trials started; run the "
            "same command with --resume to finish the search (finished trials are not run again)",
            soft_wrap=True,
        )
    for r in summary.errored:
        console.print(f"  [red]errored[/red] {r.trial_id} ({r.summary}): {r.error}")
    if summary.errored:
        console.print(
            "  errored trials stay so on --resume; where the cause was passing (a node lost, a full disk), "
            "--resume --retry-errored continues them from their last checkpoint",
            soft_wrap=True, highlight=False,
        )  # fmt: skip
    for note in summary.tracking_notes:
        console.print(f"  [yellow]MLflow[/yellow] {note}", soft_wrap=True, highlight=False)
    if summary.pareto:
        console.print("Pareto set (refined mIoU vs latency): " + ", ".join(
            f"{r.trial_id} ({_fmt(r.last.get('refined_miou'))}, {r.last.get('infer_ms_per_image', math.nan):.1f} ms)" for r in summary.pareto
        ))  # fmt: skip
    console.print(
        f"results: {summary.experiment_path} (leaderboard.csv, history.csv = every trial's epochs; "
        "each trial's folder holds its checkpoints)"
    )
    if summary.parent_run_id:
        uri = summary.tracking_uri or ""
        console.print(f"MLflow: search run {summary.parent_run_id} at {masked(uri)}", soft_wrap=True, highlight=False)
        console.print(f"browse it: {how_to_browse(uri)}", soft_wrap=True, highlight=False)


def how_to_browse(uri: str) -> str:
    """How to open the MLflow UI of the store a search logged to: ``spntune ui`` serves only a local
    store; a tracking server has its own UI (behind its login)."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("databricks") else "file"
    if scheme in ("sqlite", "file"):
        flag = "" if uri == default_tracking_uri() else f" --tracking-uri {shlex.quote(masked(uri))}"
        return f"spntune ui{flag}   (then open http://127.0.0.1:5000, view 'Model training')"
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        host = parts.hostname or ""
        base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")  # no login in a link
        reach = "" if host in ("127.0.0.1", "localhost", "::1") else (
            f"; from another machine through an SSH port-forward: ssh -L 5000:{host}:{parts.port or (443 if scheme == 'https' else 80)} <head>, "
            f"then {scheme}://127.0.0.1:5000"
        )  # fmt: skip
        return f"open {base} in a browser (the tracking server's own UI{reach})"
    if scheme == "databricks":
        return "open the experiment in your Databricks workspace"
    return f"spntune ui --tracking-uri '{masked(uri)}'   (with the database password in place of ***)"


def print_best(search: dict[str, str], rows: list[TrialRow], top: int, console: Console | None = None) -> None:
    """`spntune best`: a search's leaderboard as MLflow holds it."""
    console = console or make_console()
    title = f"search {search.get('spntune.search', '?')} (run {search['run_id']}): best {search['metric']} per trial"
    _print_leaderboard(console, title, search["metric"], rows[:top])
    console.print(f"{len(rows)} trial runs; best: {search.get('best_trial_run_id', '-')}")


def print_ui_stopped(code: int) -> None:
    """`spntune ui`'s line when the MLflow server ended without Ctrl-C (it said why above)."""
    print(f"spntune: error: the MLflow server stopped by itself (exit code {code}); its output above says why",
          file=sys.stderr)  # fmt: skip


def print_ui_banner(uri: str, host: str, port: int, console: Console | None = None) -> None:
    """Where `spntune ui` serves, what it shows, and who can reach it."""
    reach = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else f"anyone who can reach {host}"
    address = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    (console or make_console()).print(
        f"MLflow UI: http://{address}:{port}/#/experiments?workflowType=machine_learning  (tracking {masked(uri)}; "
        f"listening on {host}: {reach}); Ctrl-C stops it",
        soft_wrap=True,
    )


def print_resume(experiment: Path, space: str, trials_before: int, trials: int, console: Console | None = None) -> None:
    """What `spntune search --resume` continues: the search, its space, and its trial budget (grown or not)."""
    budget = f"{trials_before} -> {trials} trials" if trials > trials_before else f"{trials} trials"
    (console or make_console()).print(
        f"resuming {experiment} with the settings it started with (space {space}; {budget})",
        soft_wrap=True, highlight=False,
    )  # fmt: skip


def print_written(lines: list[str], console: Console | None = None) -> None:
    """One line per file (or group of files) a command wrote."""
    console = console or make_console()
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
