"""MLflow tracking: one parent run per search, one nested child run per trial.

Workers log their own child run (params, per-epoch metrics, panels, Grad-CAM, best checkpoint);
the tracking URI travels in the trial config because Ray workers do not inherit the driver's
environment. Every MLflow call goes through ``_Safe``: a few retries, then a warning, and
training goes on -- an unreachable tracking server never kills a trial. The driver reconciles
statuses at the end of each trial (ASHA-stopped -> KILLED, errored -> FAILED), so no run is
left RUNNING even when a worker dies without a chance to close its run.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "DEFAULT_TRACKING_URI",
    "SearchRun",
    "TrialTracker",
    "default_tracking_uri",
    "find_child_run",
    "finish_trial_run",
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


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ./mlflow_runs (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow_runs').resolve() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
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
            name, artifact_location=_artifact_root(uri), tags={"mlflow.experimentKind": "custom_model_development"}
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


class TrialTracker:
    """The child run of one trial (or a standalone run for ``spntune train --mlflow``).

    Args:
        tracking: the trial config's ``tracking`` section as a dict.
        trial_id: Ray's trial id (None in-process).
        params: flat resolved trial config, logged as params.
        config_yaml: the resolved config, logged as ``config.yaml``.
    """

    def __init__(
        self, tracking: dict[str, Any], trial_id: str | None, params: dict[str, Any], config_yaml: str
    ) -> None:
        self.uri = tracking["uri"]
        self.viz = bool(tracking.get("viz", True))
        self.safe = _Safe()
        self.run_id: str | None = None
        self.client: Any = None
        self.best_steps_miou: list[float] = []  # refined mIoU per step t at the best epoch
        started = self.safe("start run", lambda: self._start(tracking, trial_id, params, config_yaml))
        if started is None:
            log.warning("MLflow run could not be started at %s; this trial is not tracked", self.uri)

    def _start(self, tracking: dict[str, Any], trial_id: str | None, params: dict[str, Any], config_yaml: str) -> str:
        from mlflow.entities import Param

        self.client = _client(self.uri)
        experiment_id = _experiment_id(self.client, self.uri, tracking.get("experiment") or DEFAULT_EXPERIMENT)
        parent = tracking.get("parent_run_id")
        existing = find_child_run(self.client, experiment_id, parent, trial_id) if parent and trial_id else None
        if existing is not None:  # a resumed or retried trial continues its run
            self.run_id = existing.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, TAG_STATUS, "running")
            return self.run_id
        tags = {TAG_STATUS: "running"}
        if parent:
            tags[TAG_PARENT] = parent
        if tracking.get("search_name"):
            tags[TAG_SEARCH] = tracking["search_name"]
        if trial_id:
            tags[TAG_TRIAL] = trial_id
        run = self.client.create_run(experiment_id, tags=tags, run_name=tracking.get("run_name") or trial_id)
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        return self.run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_epoch(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in _numeric(metrics).items() if k != "epoch"]
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            chunk = batch[i : i + 900]
            self.safe("log metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def log_steps_curve(self, steps_miou: list[float]) -> None:
        """Refined mIoU against propagation step t at the best epoch (a curve in the UI: x = step)."""
        if not self.active or len(steps_miou) < 2:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric("refined_miou_by_step", v, now, t) for t, v in enumerate(steps_miou) if not math.isnan(v)]
        self.safe("log step curve", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_best(self, epoch: int, checkpoint: Path, pictures: dict[str, Any]) -> None:
        """Best epoch so far: checkpoint + pictures (``{relative path: RGB array}``), overwritten."""
        if not self.active:
            return
        from spntune.viz import save_pictures

        self.safe("log checkpoint", lambda: self.client.log_artifact(self.run_id, str(checkpoint), "checkpoint"))
        self.safe("tag best epoch", lambda: self.client.set_tag(self.run_id, "best_epoch", str(epoch)))
        if pictures:
            with tempfile.TemporaryDirectory(prefix="spntune-pics-") as tmp:
                save_pictures(pictures, Path(tmp))
                self.safe("log pictures", lambda: self.client.log_artifacts(self.run_id, tmp))

    def end(self, status: str, reason: str = "") -> None:
        """FINISHED, FAILED or KILLED, with the reason as a tag."""
        if not self.active:
            return
        self.log_steps_curve(self.best_steps_miou)
        if reason:
            self.safe("tag reason", lambda: self.client.set_tag(self.run_id, TAG_REASON, reason[:5000]))
        self.safe("tag status", lambda: self.client.set_tag(self.run_id, TAG_STATUS, status.lower()))
        self.safe("end run", lambda: self.client.set_terminated(self.run_id, status))


def finish_trial_run(
    uri: str, experiment: str, parent_run_id: str, trial_id: str, status: str, reason: str = ""
) -> str | None:
    """Driver side: close a trial's child run unless it is already closed with that status."""
    safe = _Safe(retries=2)

    def close() -> str | None:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        run = find_child_run(client, exp.experiment_id, parent_run_id, trial_id)
        if run is None:
            return None
        if run.info.status != status:  # the driver is authoritative (ASHA may "stop" a trial at its last epoch)
            if reason:
                client.set_tag(run.info.run_id, TAG_REASON, reason[:5000])
            client.set_tag(
                run.info.run_id, TAG_STATUS, {"KILLED": "stopped", "FAILED": "error"}.get(status, "finished")
            )
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    return safe("close trial run", close)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class SearchRun:
    """The parent run of a search; ``open`` creates it or, on resume, finds it again."""

    def __init__(self, uri: str, experiment: str, run_id: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self.safe = _Safe()

    @classmethod
    def open(cls, uri: str, experiment: str, search_name: str, experiment_dir: Path, params: dict[str, Any],
             space_file: Path | None, resume: bool) -> SearchRun | None:  # fmt: skip
        marker = experiment_dir / "mlflow_parent_run_id"

        def start() -> SearchRun:
            client = _client(uri)
            if resume and marker.is_file():
                run_id = marker.read_text().strip()
                client.update_run(run_id, status="RUNNING")
                return cls(uri, experiment, run_id)
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
        self, leaderboard_csv: Path, extra_files: dict[str, Path], best_trial_id: str | None, status: str = "FINISHED"
    ) -> None:
        def close() -> None:
            client = _client(self.uri)
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


def dump_config(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
