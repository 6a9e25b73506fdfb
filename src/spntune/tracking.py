"""MLflow tracking (and nothing else): one parent run per search, one nested child run per trial.

Workers log their own child run through ``MLflowReporter`` (params, per-epoch metrics, panels,
Grad-CAM, best checkpoint); the tracking URI travels in the trial config because Ray workers do not
inherit the driver's environment. Every MLflow call goes through ``_Safe``: a few retries, then a
warning, and training goes on -- an unreachable tracking server never kills a trial. The driver
reconciles statuses as each trial ends (``finish_trial_run``; ``TrialStatus`` maps to MLflow's), so
no run is left RUNNING even when a worker dies without a chance to close its run.

The read commands (``best``, ``ui``, ``predict --run``, ``evaluate --run``) open the store through
``_read_client`` / ``check_store`` instead: a URI that names no MLflow store is refused by name and
nothing is created (MLflow would create a missing SQLite database and read it empty).

``mlflow`` itself is imported inside the functions that call it: it takes seconds to import and
``spntune --help`` or a refused search must not pay for it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import yaml

from spntune.config import TrackingConfig, TrialConfig, describe_pipeline, flatten
from spntune.errors import ConfigError
from spntune.leaderboard import TrialRow, best_of, metric_mode, rank
from spntune.reporting import EpochReport, Reporter
from spntune.status import TrialStatus

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLflowReporter",
    "SearchRun",
    "artifact_root",
    "check_store",
    "check_ui",
    "complete_trial_runs",
    "default_tracking_uri",
    "download_checkpoint",
    "find_child_run",
    "finish_trial_run",
    "masked",
    "search_rows",
    "serve_ui",
]

log = logging.getLogger("spntune.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow_runs/mlflow.db"
DEFAULT_EXPERIMENT = "spntune"
TAG_SEARCH = "spntune.search"
TAG_TRIAL = "spntune.ray_trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_STATUS = "spntune.status"
TAG_REASON = "spntune.reason"
T = TypeVar("T")
#: Metrics per ``log_batch`` call (MLflow caps a batch at 1000).
METRIC_BATCH = 900


def masked(uri: str) -> str:
    """A URI fit to print: a password in it (``http://user:secret@host``) becomes ``***``."""
    return re.sub(r"(//[^/:@]+:)[^/@]+@", r"\1***@", uri)


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ./mlflow_runs (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow_runs').resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts next to a local SQLite store (``mlflow_runs/artifacts``); a server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def _client(uri: str) -> Any:
    # Our own retry loop decides how long to wait; MLflow's default HTTP retries take minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


#: URI schemes MLflow opens without a plugin (a plugin adds its own as an ``mlflow.tracking_store`` entry point).
_MLFLOW_SCHEMES = frozenset({"file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks",
                             "databricks-uc", "uc"})  # fmt: skip
_EXPECTED_STORE = ("expected sqlite:///path/to/mlflow.db (the store searches write), http(s)://HOST:PORT of an MLflow "
                   "tracking server, or a database URL (postgresql://, mysql://, mssql://)")  # fmt: skip
_WRITE_ONE = ("searches and `spntune train --mlflow` write one (e.g. `spntune search --smoke-test`); pass "
              "--tracking-uri for a store elsewhere")  # fmt: skip
#: The tables every MLflow SQL store has.
_MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs"})


def check_store(uri: str) -> None:
    """Read commands (``best``, ``ui``, ``predict --run``, ``evaluate --run``): refuse a tracking URI that names no
    MLflow store, before MLflow is imported (seconds) and without writing anything: MLflow itself would create a
    missing SQLite database (or folder) and read it empty. A server or a database server is asked by MLflow, in
    ``_read_client``.

    Raises:
        ConfigError: naming the URI (password masked) or the path, what is there, and what was expected.
    """
    shown = masked(uri)
    # MLflow reads the bare names databricks, databricks-uc and uc as schemes (Databricks' usual setting)
    scheme = uri.lower() if uri.lower() in ("databricks", "databricks-uc", "uc") else urlsplit(uri).scheme.lower()
    base = scheme.split("+")[0]  # postgresql+psycopg2
    if base == "sqlite":
        _check_sqlite(uri, shown)
    elif base in ("", "file"):
        _check_file_store(Path(unquote(urlsplit(uri).path)) if base else Path(uri), shown)
    elif base not in _MLFLOW_SCHEMES and base not in _plugin_schemes():
        raise ConfigError(f"tracking URI {shown!r}: MLflow has no store for the scheme {scheme!r}; {_EXPECTED_STORE}")


def _plugin_schemes() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="mlflow.tracking_store")}


def _check_sqlite(uri: str, shown: str) -> None:
    rest = _sqlite_rest(uri)
    if rest and not rest.startswith("/"):  # sqlite://mlflow.db: SQLAlchemy reads 'mlflow.db' as a host
        raise ConfigError(f"tracking URI {shown!r}: expected sqlite:///relative/path.db or "
                          "sqlite:////absolute/path.db (three slashes, then the path)")  # fmt: skip
    if rest.removeprefix("/") in ("", ":memory:"):
        raise ConfigError(f"tracking URI {shown!r} is an in-memory SQLite database, which holds no runs; "
                          f"{_EXPECTED_STORE}")  # fmt: skip
    path = _sqlite_file(uri)
    if not path.exists():
        raise ConfigError(f"no MLflow store at {path}{_blocked(path)}: {_WRITE_ONE}")
    if path.is_dir():
        raise ConfigError(f"tracking URI {shown!r}: {path} is a folder; expected the MLflow SQLite database "
                          f"file (e.g. sqlite:///{path.resolve() / 'mlflow.db'})")  # fmt: skip
    try:  # read-only: a file that is no MLflow store is left exactly as it is
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise ConfigError(f"tracking URI {shown!r}: {path} is not a readable SQLite database ({exc}); expected "
                          f"an MLflow store: {_WRITE_ONE}") from None  # fmt: skip
    if not _MLFLOW_TABLES <= tables:
        raise ConfigError(f"tracking URI {shown!r}: {path} is a SQLite database but not an MLflow store (it lacks "
                          f"the tables {', '.join(sorted(_MLFLOW_TABLES - tables))}); expected an MLflow store: "
                          f"{_WRITE_ONE}")  # fmt: skip


def _sqlite_rest(uri: str) -> str:
    """A ``sqlite:`` URI after its ``://``, without the query (``sqlite:mlflow.db``, no slashes: all of it)."""
    return uri.split("://", 1)[1].split("?", 1)[0] if "://" in uri else uri


def _sqlite_file(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI, as SQLAlchemy reads it (MLflow writes a space as %20)."""
    return Path(unquote(_sqlite_rest(uri)[1:]))


def _check_file_store(path: Path, shown: str) -> None:
    """A plain path: MLflow's file store (a folder), which MLflow 3 opens only when told to."""
    if not path.exists():
        raise ConfigError(f"no MLflow store at {path}{_blocked(path)}: {_WRITE_ONE}")
    if path.is_file():
        raise ConfigError(f"tracking URI {shown!r} is a file's path, which MLflow would read as a file-store "
                          f"folder; for this SQLite database pass sqlite:///{path.resolve()}")  # fmt: skip
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("1", "true"):
        inside = path / "mlflow.db"
        hint = f"; the store in it is sqlite:///{inside.resolve()}" if inside.is_file() else ""
        raise ConfigError(f"tracking URI {shown!r} is a folder: MLflow's old file store, which this MLflow opens "
                          "only with MLFLOW_ALLOW_FILE_STORE=true (`mlflow migrate-filestore` converts it to a "
                          f"database){hint}; {_EXPECTED_STORE}")  # fmt: skip


def _blocked(path: Path) -> str:
    """Why ``path`` cannot exist: its nearest existing ancestor is a file, not a folder."""
    for parent in path.absolute().parents:
        if parent.exists():
            return "" if parent.is_dir() else f" ({parent} is a file, not a folder)"
    return ""


@contextmanager
def _reading(uri: str) -> Iterator[None]:
    """What MLflow, SQLAlchemy or HTTP raise while a read command reads the store, as one error naming it."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except ImportError as exc:  # a database URL whose driver is not installed (postgresql:// without psycopg)
        raise ConfigError(f"the MLflow store at {masked(uri)} needs the Python package {exc.name or exc}, which is "
                          "not installed here: pip install it (e.g. psycopg for postgresql)") from None  # fmt: skip
    except (MlflowException, SQLAlchemyError, RequestException, sqlite3.Error) as exc:
        full = masked(str(exc)).strip()
        text = full.splitlines()[0][:300] if full else type(exc).__name__
        if urlsplit(uri).scheme.lower() in ("http", "https"):
            reason = "connection refused: nothing listens there" if "Connection refused" in full else text
            raise ConfigError(f"no MLflow tracking server answers at {masked(uri)} ({reason}); expected a running "
                              "`mlflow server` there, or pass --tracking-uri for another store") from None  # fmt: skip
        raise ConfigError(f"the MLflow store at {masked(uri)} cannot be read ({type(exc).__name__}: {text}); "
                          "expected an intact MLflow store (`mlflow db upgrade URI` upgrades an older MLflow's "
                          "database)") from None  # fmt: skip


def _read_client(uri: str) -> Any:
    """The client of every read command: the store must exist (``check_store``) and answer; none is created."""
    check_store(uri)
    # as in _client: one quick retry, not MLflow's minutes of them
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    with _reading(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # a server that does not answer says so here
    return client


class _Safe:
    """Calls MLflow with retries; after the last failure logs a warning and returns None."""

    def __init__(self, retries: int = 3, delay: float = 0.5) -> None:
        self.retries = retries
        self.delay = delay
        self.failures = 0

    def __call__(self, what: str, fn: Callable[[], T]) -> T | None:
        for attempt in range(self.retries):
            try:
                return fn()
            except Exception as exc:
                if attempt == self.retries - 1:
                    self.failures += 1
                    log.warning(
                        "MLflow %s failed after %d tries (%s: %s); training continues",
                        what,
                        self.retries,
                        type(exc).__name__,
                        exc,
                    )
                    return None
                time.sleep(self.delay * 2**attempt)
        return None


def _experiment_id(client: Any, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        # The experiment kind makes MLflow 3's UI open it in its "Model training" view, not GenAI.
        return client.create_experiment(
            name, artifact_location=artifact_root(uri), tags={"mlflow.experimentKind": "custom_model_development"}
        )
    except Exception:  # created concurrently by another worker
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_child_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflowReporter(Reporter):
    """The MLflow run of one trial: a child run of its search (or a standalone run for
    ``spntune train --mlflow``). Params and ``config.yaml`` at start, metrics every epoch, and at each
    new best epoch the weights-only checkpoint and the pictures (mask panels, h^0..h^T strips,
    Grad-CAM); at the end the refined-mIoU-by-step curve of the best epoch and the status.
    """

    def __init__(self) -> None:
        self.safe = _Safe()
        self.run_id: str | None = None
        self.client: Any = None
        self.viz = self.gradcam = True
        self.best_steps_miou: list[float] = []  # refined mIoU per step t at the best epoch
        self.logged_steps: set[int] = set()  # epochs the run already holds (a retried trial's earlier try)
        self.pending: list[Any] = []  # metrics MLflow did not take yet (server down): sent with the next report

    def start(self, cfg: TrialConfig, trial_id: str | None) -> None:
        tracking = cfg.tracking
        self.viz, self.gradcam = tracking.viz, tracking.gradcam
        params = {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith("tracking.")}
        started = self.safe("start run", lambda: self._start(tracking, trial_id, params, dump_config(cfg.to_dict())))
        if started is None:
            log.warning("MLflow run could not be started at %s; this trial is not tracked", tracking.uri)

    def _start(self, tracking: TrackingConfig, trial_id: str | None, params: dict[str, Any], config_yaml: str) -> str:
        from mlflow.entities import Param

        self.client = _client(tracking.uri or "")
        experiment_id = _experiment_id(self.client, tracking.uri or "", tracking.experiment or DEFAULT_EXPERIMENT)
        parent = tracking.parent_run_id
        existing = find_child_run(self.client, experiment_id, parent, trial_id) if parent and trial_id else None
        if existing is not None:  # a resumed or retried trial continues its run
            self.run_id = existing.info.run_id
            self.logged_steps = logged_epochs(self.client, self.run_id)
            self.client.update_run(self.run_id, status=TrialStatus.RUNNING.mlflow_status)
            self.client.set_tag(self.run_id, TAG_STATUS, TrialStatus.RUNNING.value)
            return self.run_id
        tags = {TAG_STATUS: TrialStatus.RUNNING.value}
        if parent:
            tags[TAG_PARENT] = parent
        if tracking.search_name:
            tags[TAG_SEARCH] = tracking.search_name
        if trial_id:
            tags[TAG_TRIAL] = trial_id
        run = self.client.create_run(experiment_id, tags=tags, run_name=tracking.run_name or trial_id)
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        return self.run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def report(self, epoch: EpochReport) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        step = int(epoch.metrics["epoch"])
        now = int(time.time() * 1000)
        if step not in self.logged_steps:  # each epoch once, also when a retry runs it again
            self.pending += [Metric(k, v, now, step) for k, v in _numeric(epoch.metrics).items() if k != "epoch"]
            self.logged_steps.add(step)
        self._flush()
        if epoch.is_best:
            self.best_steps_miou = epoch.steps_miou
            self._log_best(step, epoch)

    def _flush(self) -> None:
        """Sends the pending metrics; what MLflow does not take stays pending for the next try (and
        the driver's final sweep logs whatever a trial could not, from the trial's history)."""
        while self.pending:
            chunk = next(_batches(self.pending))
            sent = self.safe(
                "log metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk) or True
            )
            if not sent:
                return
            del self.pending[: len(chunk)]

    def _log_best(self, step: int, epoch: EpochReport) -> None:
        """Best epoch so far: weights-only checkpoint and pictures, overwriting the previous best's."""
        with tempfile.TemporaryDirectory(prefix="spntune-best-") as tmp:
            checkpoint = epoch.write_checkpoint(Path(tmp) / "checkpoint", False)
            self.safe("log checkpoint", lambda: self.client.log_artifact(self.run_id, str(checkpoint), "checkpoint"))
            self.safe("tag best epoch", lambda: self.client.set_tag(self.run_id, "best_epoch", str(step)))
            pictures = Path(tmp) / "pictures"
            if self.viz and epoch.write_pictures(pictures, self.gradcam):
                self.safe("log pictures", lambda: self.client.log_artifacts(self.run_id, str(pictures)))

    def _log_steps_curve(self) -> None:
        """Refined mIoU against propagation step t at the best epoch (a curve in the UI: x = step)."""
        if len(self.best_steps_miou) < 2:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric("refined_miou_by_step", v, now, t) for t, v in enumerate(self.best_steps_miou)
                 if not math.isnan(v)]  # fmt: skip
        self.safe("log step curve", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def end(self, status: TrialStatus, reason: str = "") -> None:
        if not self.active:
            return
        self._flush()
        self._log_steps_curve()
        # The driver has the last word: when it already closed this run (a search that was interrupted
        # closes its runs as soon as Ray returns, while a worker may still be finishing an epoch), the
        # trial's own view ("stopped") must not overwrite it.
        current = self.safe("read run status", lambda: self.client.get_run(self.run_id).info.status)
        if current is not None and current != TrialStatus.RUNNING.mlflow_status:
            return
        if reason:
            self.safe("tag reason", lambda: self.client.set_tag(self.run_id, TAG_REASON, reason[:5000]))
        self.safe("tag status", lambda: self.client.set_tag(self.run_id, TAG_STATUS, status.value))
        self.safe("end run", lambda: self.client.set_terminated(self.run_id, status.mlflow_status))


def logged_epochs(client: Any, run_id: str) -> set[int]:
    """The epochs a trial's run holds metrics of (every epoch logs ``epoch_seconds``)."""
    return {int(m.step) for m in client.get_metric_history(run_id, "epoch_seconds")}


def wait_for_tracking(uri: str, seconds: float) -> bool:
    """Driver side, before the final sweep: a tracking server that is down (restarting) gets up to
    ``seconds`` to come back. Local stores answer at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            _client(uri).search_experiments(max_results=1)
            return True
        except Exception:
            if time.monotonic() >= deadline:
                return False
            log.warning("MLflow at %s does not answer; waiting for it (up to %.0f s more)", masked(uri),
                        deadline - time.monotonic())  # fmt: skip
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def _child_runs(client: Any, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """Every child run of a search by trial id, in one listing (paged by MLflow's 1000 runs a page)."""
    runs: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)  # fmt: skip
        for run in page:
            runs.setdefault(run.data.tags.get(TAG_TRIAL, ""), run)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _batches(items: list[T]) -> Iterator[list[T]]:
    """``items`` in pieces MLflow takes in one ``log_batch`` (it caps a batch at 1000 metrics)."""
    for i in range(0, len(items), METRIC_BATCH):
        yield items[i : i + METRIC_BATCH]


def _backfill(client: Any, experiment_id: str, run: Any | None, parent_run_id: str, search_name: str,
              row: TrialRow) -> tuple[Any, list[str]]:  # fmt: skip
    """One trial's run, created if missing, with every epoch of the trial's history it lacks; notes."""
    from mlflow.entities import Metric, Param

    notes = []
    if run is None:
        tags = {TAG_PARENT: parent_run_id, TAG_TRIAL: row.trial_id, TAG_SEARCH: search_name,
                TAG_STATUS: TrialStatus.RUNNING.value}  # fmt: skip
        run = client.create_run(experiment_id, tags=tags, run_name=row.trial_id)
        params = {k: v for k, v in row.config.items() if not k.startswith("tracking.")}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        notes.append(
            f"trial {row.trial_id}: its MLflow run was created at the end (MLflow was unreachable when it started)"
        )
    run_id = run.info.run_id
    logged = logged_epochs(client, run_id)
    missing = [h for h in row.history if int(h.get("epoch", 0)) not in logged]
    now = int(time.time() * 1000)
    for chunk in _batches([Metric(k, v, now, int(h["epoch"])) for h in missing for k, v in _numeric(h).items()
                           if k != "epoch"]):  # fmt: skip
        client.log_batch(run_id, metrics=chunk)
    if missing:
        epochs = ", ".join(str(h["epoch"]) for h in missing)
        notes.append(f"trial {row.trial_id}: metrics of epoch {epochs} logged at the end (MLflow was unreachable)")
    if row.epochs > 0 and not client.list_artifacts(run_id, "checkpoint"):
        notes.append(f"trial {row.trial_id}: no best checkpoint or pictures in MLflow (unreachable when they were "
                     f"logged); its checkpoints are in {row.path}")  # fmt: skip
    return run, notes


def _set_final_status(client: Any, run: Any, status: TrialStatus, reason: str) -> None:
    if run.info.status != status.mlflow_status or run.data.tags.get(TAG_STATUS) != status.value:
        if reason:
            client.set_tag(run.info.run_id, TAG_REASON, reason[:5000])
        client.set_tag(run.info.run_id, TAG_STATUS, status.value)
        client.set_terminated(run.info.run_id, status.mlflow_status)


def complete_trial_runs(uri: str, experiment: str, parent_run_id: str, search_name: str,
                        rows: list[TrialRow]) -> list[str]:  # fmt: skip
    """Driver side, at the end of a search: every trial's run gets what the trial could not log while
    the tracking server was unreachable (the run itself if it could not be created, and every epoch of
    the trial's history that the run lacks), then its final status. The search's child runs are listed
    once. Returns notes on what is still missing (a best epoch's checkpoint and pictures exist only
    where the trial logged them) or could not be done."""
    safe = _Safe(retries=2)
    client = _client(uri)
    try:
        experiment_id = _experiment_id(client, uri, experiment)
        runs = _child_runs(client, experiment_id, parent_run_id)
    except Exception as exc:  # the server went away again: say so, keep the search's own results
        return [f"MLflow backfill failed ({type(exc).__name__}: {exc}); every result is in the search's folder"]
    notes: list[str] = []
    for row in rows:
        run = runs.get(row.trial_id)
        try:
            run, row_notes = _backfill(client, experiment_id, run, parent_run_id, search_name, row)
            notes += row_notes
        except Exception as exc:
            notes.append(f"trial {row.trial_id}: MLflow backfill failed ({type(exc).__name__}: {exc})")
            # a run the backfill created before failing still gets its final status
            run = run or safe("find trial run", lambda row=row: find_child_run(client, experiment_id, parent_run_id,
                                                                              row.trial_id))  # fmt: skip
        if run is not None:
            reason = row.status.reason(row.epochs, row.error)
            safe(
                "close trial run",
                lambda run=run, row=row, reason=reason: _set_final_status(client, run, row.status, reason),
            )
    return notes


def finish_trial_run(
    uri: str, experiment: str, parent_run_id: str, trial_id: str, status: TrialStatus, reason: str = ""
) -> str | None:
    """Driver side, as a trial ends: give its run its final status unless it already has it. The driver
    is authoritative: ASHA may stop a trial at its last epoch, a dead worker cannot close its run."""
    safe = _Safe(retries=2)

    def close() -> str | None:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        run = find_child_run(client, exp.experiment_id, parent_run_id, trial_id)
        if run is None:
            return None
        _set_final_status(client, run, status, reason)
        return run.info.run_id

    return safe("close trial run", close)


def search_rows(uri: str, experiment: str, search: str | None) -> tuple[dict[str, str], list[TrialRow]]:
    """``spntune best``: a search's parent-run tags and params and its trials as leaderboard rows, read
    from MLflow alone (works after the Ray results folder is gone). ``search`` None: the latest.

    Raises:
        ConfigError: no readable MLflow store at ``uri`` (``check_store``); nothing is created there.
        FileNotFoundError: no such experiment or search at ``uri``.
    """
    client = _read_client(uri)
    with _reading(uri):  # a server or database that fails half-way
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise FileNotFoundError(f"no MLflow experiment {experiment!r} at {masked(uri)}")
        searches = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
                    if TAG_SEARCH in r.data.tags and TAG_PARENT not in r.data.tags and r.data.tags[TAG_SEARCH] == (search or r.data.tags[TAG_SEARCH])]  # fmt: skip
        if not searches:
            raise FileNotFoundError(
                f"no search {search + ' ' if search else ''}in experiment {experiment!r} at {masked(uri)}"
            )
        parent = searches[0]
        metric = parent.data.params.get("metric", "refined_miou")
        mode = metric_mode(metric)
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'", max_results=5000
        )
        rows = []
        for run in children:
            history = client.get_metric_history(run.info.run_id, metric)
            by_step = {h.step: h.value for h in history}  # a retried epoch logged twice counts once (the last)
            status = _status_of(run)
            rows.append(TrialRow(run.data.tags.get(TAG_TRIAL, ""), status, describe_pipeline(run.data.params),
                                 len(by_step), best_of(list(by_step.values()), mode), dict(run.data.metrics),
                                 path=run.info.artifact_uri, error=run.data.tags.get(TAG_REASON, "") if status is TrialStatus.ERROR else "",
                                 config=dict(run.data.params), run_id=run.info.run_id))  # fmt: skip
        info = {**parent.data.tags, "run_id": parent.info.run_id, "metric": metric, "mode": mode}
        return info, rank(rows, mode)


def _status_of(run: Any) -> TrialStatus:
    try:
        return TrialStatus(run.data.tags.get(TAG_STATUS, ""))
    except ValueError:  # a run closed by another tool: map MLflow's own status
        by_mlflow = {s.mlflow_status: s for s in TrialStatus}
        return by_mlflow.get(run.info.status, TrialStatus.RUNNING)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class SearchRun:
    """The parent run of a search; ``open`` creates it or, on resume, finds it again."""

    def __init__(self, uri: str, experiment: str, run_id: str, previous_status: str | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self.previous_status = previous_status  # a resumed run's status before the resume set it RUNNING
        self.safe = _Safe()

    @classmethod
    def open(cls, uri: str, experiment: str, search_name: str, experiment_dir: Path, params: dict[str, Any],
             space_file: Path | None, resume: bool) -> SearchRun | None:  # fmt: skip
        marker = experiment_dir / "mlflow_parent_run_id"

        def start() -> SearchRun:
            client = _client(uri)
            if resume and marker.is_file():
                run_id = marker.read_text().strip()
                previous = client.get_run(run_id).info.status
                client.update_run(run_id, status="RUNNING")
                return cls(uri, experiment, run_id, previous)
            experiment_id = _experiment_id(client, uri, experiment)
            tags = {TAG_SEARCH: search_name, "ray_storage_path": str(experiment_dir)}
            commit = _git_commit()
            if commit:
                tags["git_commit"] = commit
            run = client.create_run(experiment_id, tags=tags, run_name=search_name)
            from mlflow.entities import Param

            client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
            if space_file is not None and space_file.is_file():
                client.log_artifact(run.info.run_id, str(space_file), "search_space")
            experiment_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(run.info.run_id)
            return cls(uri, experiment, run.info.run_id)

        return _Safe()("open search run", start)

    def finish(
        self, leaderboard_csv: Path, extra_files: dict[str, Path], best_trial_id: str | None, status: str = "FINISHED",
        tags: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        def close() -> None:
            client = _client(self.uri)
            for key, value in (tags or {}).items():
                client.set_tag(self.run_id, key, value)
            client.log_artifact(self.run_id, str(leaderboard_csv), "leaderboard")
            for key, path in extra_files.items():
                client.log_artifact(self.run_id, str(path), key.split("/")[0])
            if best_trial_id:
                client.set_tag(self.run_id, "best_trial_id", best_trial_id)
                exp = client.get_experiment_by_name(self.experiment)
                best = find_child_run(client, exp.experiment_id, self.run_id, best_trial_id) if exp else None
                if best is not None:
                    client.set_tag(self.run_id, "best_trial_run_id", best.info.run_id)
            client.set_terminated(self.run_id, status)

        self.safe("finish search run", close)

    def fail(self, reason: str, nothing_ran: bool = False) -> None:
        """The search stopped on an error before it finished, with the reason as a tag: FAILED, except that a
        resumed run where ``nothing_ran`` gets back the status it had (its trials are as they were; a run
        left RUNNING by a driver that died becomes FAILED)."""
        kept = self.previous_status if nothing_ran and self.previous_status != "RUNNING" else None

        def close() -> None:
            client = _client(self.uri)
            client.set_tag(self.run_id, "spntune.reason", reason[:5000])
            client.set_terminated(self.run_id, kept or "FAILED")

        self.safe("close search run", close)


def check_ui(uri: str, host: str, port: int) -> None:
    """``spntune ui`` before it says where it serves: the port is one, the store exists on this machine
    (``check_store``; none is created), and ``host:port`` can be listened on now. Without this, MLflow prints
    its banner and starts for seconds before its web server fails -- and ``mlflow server`` still exits 0.

    Raises:
        ConfigError: naming the port, host or URI and what was expected.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be an integer 1-65535, got {port}")
    if urlsplit(uri).scheme.lower() in ("http", "https", "databricks", "databricks-uc", "uc"):
        raise ConfigError(f"`spntune ui` serves a store on this machine; {masked(uri)} is a tracking server, which "
                          "has its own UI: open it in a browser")  # fmt: skip
    check_store(uri)
    _check_listen(host, port)


def _check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (its address family, SO_REUSEADDR) and let it go again."""
    examples = "expected an address of this machine, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    if re.fullmatch(r"[0-9.]+", host):  # refused here, not after a DNS lookup of '999.1.1.1'
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"--host {host!r} is not an IPv4 address (four numbers 0-255); {examples}") from None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free, as for uvicorn
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise ConfigError(f"--host {host!r} cannot be resolved ({exc.strerror}); {examples}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another `spntune ui` or server?); pick a free "
                                  f"one with --port, e.g. --port {_free_port(host, port)}") from None  # fmt: skip
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host!r} is not an address of this machine; {examples}") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"port {port} needs root (ports below 1024 do); pick one above 1023 with --port, "
                                  "e.g. --port 5000") from None  # fmt: skip
            raise ConfigError(f"cannot listen on {host} port {port} ({exc.strerror}); pick another --port or "
                              "--host") from None  # fmt: skip


def _free_port(host: str, port: int) -> int:
    """A port near ``port`` that ``host`` can listen on now (to suggest; the OS's pick if none near is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in [*range(port + 1, min(port + 20, 65535) + 1), 0]:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    return 5000


def serve_ui(uri: str, port: int, host: str = "127.0.0.1") -> int:
    """Run the MLflow UI for ``uri`` on ``host:port`` until Ctrl-C (``check_ui`` first: this creates nothing).
    MLflow's own host-header and CORS protection stay on.

    Returns:
        0 after Ctrl-C; otherwise the server stopped by itself, which is a failure: its exit code, or 1 where
        that is 0 (``mlflow server`` exits 0 even when its web server could not start).
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    root = artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    try:
        return subprocess.run(cmd, check=False).returncode or 1
    except KeyboardInterrupt:
        return 0


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


#: Where a trial run keeps its best checkpoint, under the run's artifacts.
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"


def local_checkpoint(uri: str, run_id: str) -> Path | None:
    """A trial run's best checkpoint file where the store is a SQLite database (the default, and what searches
    write) that keeps the run's artifacts on this machine: found with ``sqlite3`` alone, in milliseconds, where
    MLflow takes seconds to import before it copies the file. None where the store is another kind, or the
    run's artifacts lie elsewhere (a server's, s3://): ``download_checkpoint`` fetches it then. Call after
    ``check_store``.

    Raises:
        FileNotFoundError: the store has no such run, or the run has no checkpoint (as ``download_checkpoint``).
    """
    if urlsplit(uri).scheme.lower().split("+")[0] != "sqlite":  # sqlite+pysqlite:// as SQLAlchemy names a driver
        return None
    db = _sqlite_file(uri)
    try:  # read-only, as check_store
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error:  # a schema this does not know, a locked file: MLflow reads it
        return None
    if row is None:
        raise FileNotFoundError(f"run {run_id} has no {CHECKPOINT_ARTIFACT} artifact at {masked(uri)}: the store "
                                "has no run with that id (`spntune best` lists a search's runs)")  # fmt: skip
    artifacts = str(row[0] or "")
    parts = urlsplit(artifacts)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        folder = Path(unquote(parts.path))
    elif not parts.scheme and Path(artifacts).is_absolute():  # MLflow stores a local root as a plain path
        folder = Path(artifacts)
    else:
        return None
    path = folder / CHECKPOINT_ARTIFACT
    if not path.is_file():
        raise FileNotFoundError(f"run {run_id} has no {CHECKPOINT_ARTIFACT} artifact at {masked(uri)}: {path} "
                                "does not exist (a trial that stopped before its first epoch ended saves none)")  # fmt: skip
    return path


def download_checkpoint(uri: str, run_id: str, folder: Path) -> Path:
    """A trial run's best checkpoint (``CHECKPOINT_ARTIFACT``), copied into ``folder``: without MLflow where
    ``local_checkpoint`` finds it (a copy, not the file itself: a trial still running rewrites it in place).

    Raises:
        ConfigError: no readable MLflow store at ``uri`` (``check_store``); nothing is created there.
        FileNotFoundError: the run does not exist or has no checkpoint artifact.
    """
    local = local_checkpoint(uri, run_id)
    if local is not None:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(local, folder / local.name))
    client = _read_client(uri)
    try:
        return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(folder)))
    except Exception as exc:
        raise FileNotFoundError(f"run {run_id} has no {CHECKPOINT_ARTIFACT} artifact at {masked(uri)}: {exc}") from None
