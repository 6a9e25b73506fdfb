"""``spntune search``: the Ray Tune + Optuna driver.

One trial = ``train_segmentation`` behind a ``RayReporter``. The driver checks the options, starts or
joins Ray, opens the search's MLflow parent run, runs a ``Tuner`` with ``OptunaSearch`` (TPE,
behind ``DistinctSearcher``: no configuration is trained twice) and ASHA, and turns Ray's results
into leaderboard rows (``leaderboard.py``). ``--resume`` continues an interrupted search from its
storage folder (the Optuna study included), with the settings it started with
(``search_options.resumed``); a larger ``--trials`` adds trials to a search, interrupted or finished
(``GrowableSearch``).

``SchedulerState``, a third callback, keeps ASHA's rung records in the search's checkpoints (Ray does
not), so a resumed or grown search's trials are still compared with every trial before them.

Two Ray callbacks watch the trials from the driver. ``TrackingCallback`` gives each trial's MLflow
run its final status as the trial ends; it pickles with its settings, so it keeps working after
``--resume`` (Ray restores callbacks from the pickled run config). ``ListenerCallback`` forwards
trial events to whatever listens in this process (the live terminal table), found by the search's
path, so a resumed search gets its table too.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from spntune.allocator import worker_env
from spntune.config import ConfigError, describe_pipeline
from spntune.distinct import DistinctSearcher
from spntune.errors import ClusterError
from spntune.leaderboard import (
    SearchSummary,
    TrialRow,
    best_of,
    expected_epochs,
    pareto,
    rank,
    search_plots,
    write_history,
    write_leaderboard,
    write_leaderboard_html,
)
from spntune.reporting import EpochReport, Reporter, TrialStopped
from spntune.search_options import (
    OBJECTIVES,
    SETTINGS_FILE,
    SearchOptions,
    check_search,
    check_storage,
    grow_settings,
    read_settings,
    search_lock,
    write_settings,
)
from spntune.space import SearchSpace
from spntune.status import TrialStatus
from spntune.tracking import (
    SearchRun,
    complete_trial_runs,
    default_tracking_uri,
    finish_trial_run,
    masked,
    wait_for_tracking,
)
from spntune.trainables import HISTORY_FILE, read_history, train_segmentation

__all__ = [
    "OBJECTIVES",
    "GrowableSearch",
    "ListenerCallback",
    "RayReporter",
    "SchedulerState",
    "SearchOptions",
    "TrackingCallback",
    "TrialListener",
    "run_search",
    "run_trial",
]


#: Node-local staging folders of trial processes: ``spntune-trial-<pid>-<random>``.
STAGING_PREFIX = "spntune-trial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_staging(parent: Path | None = None) -> list[Path]:
    """Remove the staging folders of trial processes that no longer run on this node (a worker
    killed by SIGKILL, the OOM killer or a node restart cannot clean up after itself); returns them."""
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class RayReporter(Reporter):
    """Reports to Ray Tune with a checkpoint every epoch; resumes from Ray's checkpoint.

    Ray stops a trial (ASHA) by calling ``sys.exit`` inside ``tune.report``; that becomes
    ``TrialStopped`` here, so the trial ends its other reporters with status ``stopped``.

    Checkpoints are staged in one node-local folder per trial process (``tune.report`` copies it to
    the search's storage), made on first use, emptied before every epoch's checkpoint and removed when
    the trial ends (``end``); folders left by killed processes are swept by the next trial on the node.
    """

    def __init__(self) -> None:
        self._node_id = ray.get_runtime_context().get_node_id()
        self._staging: Path | None = None

    def trial_id(self) -> str | None:
        return tune.get_context().get_trial_id()

    def _fresh(self, name: str) -> Path:
        if self._staging is None:
            sweep_stale_staging()
            self._staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        folder = self._staging / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def resume_checkpoint(self) -> Path | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(str(self._fresh("restored"))))

    def report(self, epoch: EpochReport) -> None:
        staged = self._fresh("checkpoint")
        epoch.write_checkpoint(staged, True)
        try:  # tune.report copies the folder to the search's storage
            tune.report({**epoch.metrics, "node_id": self._node_id}, checkpoint=tune.Checkpoint.from_directory(staged))
        except SystemExit as exc:
            raise TrialStopped("stopped early by the scheduler") from exc
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def end(self, status: TrialStatus, reason: str = "") -> None:
        """The trial ended (Ray learns how from the trial's exception or return): remove its staging folder."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def run_trial(config: dict[str, Any], space: SearchSpace, overrides: dict[str, Any]) -> None:
    """Ray Tune function trainable: Optuna's suggestions -> trial config -> train."""
    train_segmentation(trial_config(space, config, overrides, tracking=True), RayReporter())


def trial_config(space: SearchSpace, suggested: dict[str, Any], overrides: dict[str, Any],
                 tracking: bool = False) -> dict[str, Any]:  # fmt: skip
    """The flat config a trial runs with; ``tracking=False`` leaves the ``tracking.*`` keys out."""
    kept = overrides if tracking else {k: v for k, v in overrides.items() if not k.startswith("tracking.")}
    return {**space.to_trial_config(suggested), **kept}


class TrialListener(Protocol):
    """Something in the driver process that follows the trials (the live terminal table)."""

    def trial_event(self, trial_id: str, config: dict[str, Any], status: TrialStatus,
                    result: dict[str, Any] | None) -> None: ...  # fmt: skip


#: Listeners of the searches running in this process, by search path (see ``ListenerCallback``).
_LISTENERS: dict[str, TrialListener] = {}


class SchedulerState(tune.Callback):
    """Keeps the scheduler's state (ASHA's rungs: each milestone's recorded trial results) in the search's
    checkpoints. Ray 2.60 checkpoints the searcher's state and the callbacks', not the scheduler's: a resumed
    search started ASHA with empty rungs, so the trials that reported after ``--resume`` (a grown search's new
    ones among them) were compared only with each other, and the first at each rung always went on.

    Ray pickles the run config's callbacks and the tune config's scheduler into one ``tuner.pkl``, so the
    callback a resume unpickles holds the scheduler it unpickles. Ray restores callback state before it
    re-adds the unfinished trials to the scheduler (``TuneController.resume``), so those get their brackets
    from the restored rungs."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any] | None:
        if not isinstance(self.scheduler, AsyncHyperBandScheduler):
            return None  # FIFO: nothing to keep
        return {"scheduler": dict(self.scheduler.__dict__)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.__dict__.update(state["scheduler"])


class ListenerCallback(tune.Callback):
    """Forwards trial events to the listener registered for its search in this process. It holds the
    search's path, not the listener, so the copy Ray restores on ``--resume`` finds the new process's."""

    def __init__(self, key: str, space: SearchSpace, overrides: dict[str, Any]) -> None:
        self.key, self.space, self.overrides = key, space, overrides

    def _send(self, trial: Any, status: TrialStatus, result: dict | None = None) -> None:
        listener = _LISTENERS.get(self.key)
        if listener is not None:
            try:
                config = trial_config(self.space, trial.config, self.overrides)
            except ConfigError:  # not this space's parameters: show them as they are
                config = dict(trial.config)
            listener.trial_event(trial.trial_id, config, status, result)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, TrialStatus.RUNNING)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._send(trial, TrialStatus.RUNNING, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, _ended(trial, self.space, self.overrides, errored=False))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._send(trial, TrialStatus.ERROR)


class TrackingCallback(tune.Callback):
    """Closes each trial's MLflow run with its final status as the trial ends (pickles whole)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, space: SearchSpace,
                 overrides: dict[str, Any]) -> None:  # fmt: skip
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.space, self.overrides = space, overrides

    def _close(self, trial: Any, errored: bool) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
        status = _ended(trial, self.space, self.overrides, errored)
        finish_trial_run(self.uri, self.experiment, self.parent_run_id, trial.trial_id, status, status.reason(epochs))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, errored=True)


def _ended(trial: Any, space: SearchSpace, overrides: dict[str, Any], errored: bool) -> TrialStatus:
    epochs = int((trial.last_result or {}).get("epoch", 0) or 0)
    try:
        expected = expected_epochs(trial_config(space, trial.config, overrides))
    except ConfigError:
        expected = -1
    return TrialStatus.of(errored, epochs, expected)


def _drop_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _init_ray(address: str | None) -> bool:
    """Starts (or connects to) Ray unless this process already did; whether it started or connected now."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # legacy engine: verbose=0 is silent, our table shows progress
    # Ray saves the search's state whenever a trial has written num_to_keep (2) checkpoints since the last save,
    # which is what lets a search resume without losing a trial; with short epochs that is every few seconds,
    # and Ray warned about it, three lines each time (seen in `make demo` on a fast machine). 0 turns the
    # warning off; the saves stay.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    if not address:
        # A Ray started here uses token authentication (Ray's default for local clusters since 2.60;
        # the token lives in ~/.ray/auth_token). Ray says so in a warning on every start that the user
        # cannot act on, so that one message is dropped; the README explains it once.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_drop_token_notice)
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    env = worker_env()  # glibc settings a trial's worker needs from its start (allocator.py)
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:  # "local": a Ray of its own, even where a `ray start` cluster runs on this machine
            ray.init(address="local", include_dashboard=False, **kwargs)
    # ValueError: our runtime environment clashes with one the job was submitted with
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:400]
        raise ClusterError(f"could not start or reach {where}: {first}") from None
    return True


def run_search(opts: SearchOptions, listener: TrialListener | None = None) -> SearchSummary:
    """Run (or resume) a search; ``listener`` (e.g. the live table) follows its trials. Bad options and
    data are refused before anything is written; the search's lock is held throughout (a second search
    of the same name is refused), and the storage checks run again under it."""
    objectives = check_search(opts)  # the dataset's listing too
    with search_lock(opts):
        check_storage(opts, locked=True)  # what may have changed before the lock was ours
        return _run_search(opts, objectives, listener)


def _run_search(
    opts: SearchOptions, objectives: list[tuple[str, str]], listener: TrialListener | None
) -> SearchSummary:
    metric, mode = objectives[0]
    start = time.perf_counter()
    experiment = opts.experiment_path
    uri = None if (opts.tracking_uri or "").lower() == "none" else (opts.tracking_uri or default_tracking_uri())
    # Ray first: where it cannot start, no MLflow run is left RUNNING and no search folder half made (a folder
    # without Ray's state could be neither started again nor resumed)
    started = _init_ray(opts.address)
    parent = _open_parent_run(opts, uri, metric) if uri else None
    overrides = dict(opts.overrides)
    # Two-stage trials share coarse networks through a cache in the storage (every search there, and on
    # a cluster every node, when the storage is a shared file system); --set train.coarse_cache_dir wins.
    overrides.setdefault("train.coarse_cache_dir", str(opts.storage.resolve() / "coarse_cache"))
    # Likewise the decoded images of file datasets (data/cache.py): decoded by the first trial, read by all.
    overrides.setdefault("data.cache_dir", str(opts.storage.resolve() / "data_cache"))
    callbacks: list[tune.Callback] = [ListenerCallback(str(experiment), opts.space, overrides)]
    if parent is not None and uri is not None:  # the URI travels in the config: workers do not inherit the env
        overrides |= {"tracking.uri": uri, "tracking.experiment": opts.experiment, "tracking.parent_run_id": parent.run_id,
                      "tracking.search_name": opts.name, "tracking.viz": opts.viz}  # fmt: skip
        callbacks.append(TrackingCallback(uri, opts.experiment, parent.run_id, opts.space, overrides))
    if listener is not None:
        _LISTENERS[str(experiment)] = listener
    watch, guard, fitting = _InterruptWatch(), _RestoreGuard(experiment), False
    ray_tune_log, controller_log = logging.getLogger("ray.tune.tune"), logging.getLogger(_RestoreGuard.LOGGER)
    ray_tune_log.addFilter(watch)
    controller_log.addFilter(guard)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multivariate/group TPE
            tuner = _tuner(opts, overrides, objectives, callbacks)
            _record_settings(opts, tuner)
            fitting = True
            results = tuner.fit()
    except Exception as exc:  # no trial result is lost (each is in its folder); nothing is left RUNNING
        if parent is not None:  # a resumed search's run keeps its status where no trial ran (guard: before any)
            parent.fail(f"{type(exc).__name__}: {_first_line(exc)}", nothing_ran=not fitting or guard.fired)
        if started and not opts.address:
            ray.shutdown()
        if not opts.resume and not (experiment / "tuner.pkl").exists():
            _remove_unstarted(experiment)  # else its name could be neither started again nor resumed
        raise
    finally:
        _LISTENERS.pop(str(experiment), None)
        ray_tune_log.removeFilter(watch)
        controller_log.removeFilter(guard)
    rows = rank([_row(r, opts.space, metric, mode, overrides, watch.interrupted) for r in results], mode)
    summary = SearchSummary(rows, experiment, metric, time.perf_counter() - start)
    summary.interrupted, summary.trials_asked = watch.interrupted, opts.trials
    searcher = _distinct_searcher(tuner)
    if searcher is not None:
        summary.repeats_skipped, summary.space_exhausted = searcher.skipped, searcher.exhausted
    summary.pareto = pareto(rows, objectives) if len(objectives) > 1 else []
    write_leaderboard(summary, experiment / "leaderboard.csv")
    write_history(rows, experiment / "history.csv")
    if parent is not None and uri is not None:
        _finish_parent_run(parent, uri, opts, summary, mode)
    if started and not opts.address:  # a local Ray of its own; a Ray the caller started stays theirs
        ray.shutdown()
    return summary


class _InterruptWatch(logging.Filter):
    """Notices that Ray Tune stopped the search on Ctrl-C (SIGINT; it then saves the search's state and
    returns) and drops Ray's hint to call ``Tuner.restore``: the summary says to ``--resume`` instead."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "has been interrupted" in record.getMessage():
            self.interrupted = True
            return False
        return True


def _remove_unstarted(experiment: Path) -> None:
    """A new search's folder that Ray never wrote its state into, with the files spntune put there first."""
    for name in ("mlflow_parent_run_id", SETTINGS_FILE):
        (experiment / name).unlink(missing_ok=True)
    try:
        experiment.rmdir()
    except OSError:  # something else is there: left for the user to see
        pass


class _RestoreGuard(logging.Filter):
    """Where ``--resume`` finds a search state Ray cannot read, Ray 2.60 logs "Failed to restore the run state"
    and starts the search over, its finished trials dropped from the results. ``ray_state.check_resumable``
    refuses the damage it can see before Ray starts; any other failure to restore stops the resume here, as
    Ray logs it and before a trial starts: a filter's exception leaves through Ray's ``logger.exception``."""

    LOGGER = "ray.tune.execution.tune_controller"

    def __init__(self, experiment: Path) -> None:
        super().__init__()
        self.experiment = experiment
        self.fired = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to restore the run state"):
            self.fired = True
            cause = record.exc_info[1] if record.exc_info and record.exc_info[1] else None
            raise ConfigError(
                f"cannot resume the search at {self.experiment}: Ray could not restore its state"
                + (f" ({_first_line(cause)})" if cause is not None else "")
                + "; nothing was run. Put the search's files back as they were, or start a new search (another --name)"
            )
        return True


def _open_parent_run(opts: SearchOptions, uri: str, metric: str) -> SearchRun | None:
    params = {"space": opts.space.name, "trials": opts.trials, "concurrency": opts.concurrency,
              "scheduler": opts.scheduler, "metric": metric, "objectives": ",".join(opts.objectives),
              "gpus_per_trial": opts.gpus_per_trial, "cpus_per_trial": opts.cpus_per_trial,
              "overrides": opts.overrides}  # fmt: skip
    return SearchRun.open(uri, opts.experiment, opts.name, opts.experiment_path, params, opts.space_file, opts.resume)


def tpe_sampler(seed: int, trials: int) -> optuna.samplers.TPESampler:
    """The sampler of every search: multivariate TPE over groups (conditional spaces), a constant liar for
    the trials still running, random for the first ``min(10, trials)``."""
    return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                      n_startup_trials=min(10, trials))  # fmt: skip


def _tuner(opts: SearchOptions, overrides: dict[str, Any], objectives: list[tuple[str, str]],
           callbacks: list[tune.Callback]) -> tune.Tuner:  # fmt: skip
    """A new Tuner, or on ``--resume`` the stored one (its searcher, scheduler and callbacks restored)."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=opts.space, overrides=overrides),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    if opts.resume:  # finished trials are not re-run; errored ones with --retry-errored, from their checkpoints
        return tune.Tuner.restore(str(opts.experiment_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=opts.retry_errored)  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (metric, mode), metrics, modes = objectives[0], [m for m, _ in objectives], [mo for _, mo in objectives]
    sampler = tpe_sampler(opts.seed, opts.trials)
    optuna_search = OptunaSearch(space=opts.space.define_by_run, metric=metrics if len(metrics) > 1 else metric,
                                 mode=modes if len(modes) > 1 else mode, sampler=sampler,
                                 points_to_evaluate=opts.space.points_to_evaluate or None)  # fmt: skip
    # A configuration that ran is not run again (DistinctSearcher); at most --concurrency trials at once
    # (what TuneConfig.max_concurrent_trials would wrap around a Searcher, built here because GrowableSearch
    # is already a SearchGenerator, which Ray does not wrap).
    searcher = GrowableSearch(ConcurrencyLimiter(DistinctSearcher(optuna_search), max_concurrent=opts.concurrency))
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode, max_t=1000,
                      grace_period=opts.grace_period, reduction_factor=opts.reduction_factor)
        if opts.scheduler == "asha" else FIFOScheduler()
    )  # fmt: skip
    # A fresh actor re-imports torch + smp (~5 s here); the trainable is a pure function of its
    # config (it reseeds itself), so actors can be reused safely.
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=opts.trials,
                                  reuse_actors=True)  # fmt: skip
    run_config = tune.RunConfig(name=opts.name, storage_path=str(opts.storage.resolve()), verbose=0,
                                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                callbacks=[*callbacks, SchedulerState(scheduler)])  # fmt: skip
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _record_settings(opts: SearchOptions, tuner: tune.Tuner) -> None:
    """A new search's settings (``search_options.write_settings``); on a resume with a larger trial budget,
    that budget handed to the restored search algorithm (``GrowableSearch``: Ray restores the budget the
    search had) and then recorded, so the file never claims trials that will not run."""
    if not opts.resume:
        write_settings(opts)
        return
    stored = read_settings(opts.experiment_path)
    if stored is None or opts.trials <= stored["trials"]:
        return
    alg = _search_alg(tuner)
    if not isinstance(alg, GrowableSearch):  # not one spntune built, or not reachable (Ray Client)
        raise ConfigError(
            f"--trials {opts.trials}: the search at {opts.experiment_path} cannot add trials here (its search "
            f"algorithm is not reachable as spntune's GrowableSearch); resume it without --trials ({stored['trials']})"
        )
    alg.trials = opts.trials
    grow_settings(opts.experiment_path, opts.trials)


class GrowableSearch(SearchGenerator):
    """Ray's ``SearchGenerator`` (which runs a ``Searcher`` for a budget of ``num_samples`` trials) whose budget
    a resume can raise. Ray keeps the budget in the search's state and restores it on ``Tuner.restore``,
    whatever the new command asks; ``trials``, set on the restored object before ``fit``, replaces it once the
    state is loaded. Nothing else changes: the finished trials stay finished, the Optuna study (TPE) and
    ``DistinctSearcher`` keep what they learnt, and the new trials come on top."""

    def __init__(self, searcher: Any) -> None:
        super().__init__(searcher)
        self.trials: int | None = None  # None: the restored budget

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if self.trials is not None and self.trials > self._total_samples:
            self._total_samples = self.trials


def _search_alg(tuner: tune.Tuner) -> Any:
    """The search algorithm a Tuner holds (the one ``_tuner`` built, or on ``--resume`` the one Ray unpickled),
    through Ray's private ``Tuner._local_tuner`` (absent under Ray Client: None)."""
    return getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "search_alg", None)


def _distinct_searcher(tuner: tune.Tuner) -> DistinctSearcher | None:
    """The ``DistinctSearcher`` a Tuner ran its search with, state and all: the one ``_tuner`` built, or on
    ``--resume`` the one Ray unpickled and gave the saved state (``set_state``). Read through Ray's private
    ``Tuner._local_tuner`` (absent under Ray Client): None where it cannot be found, and the summary is
    silent about repeats."""
    alg = _search_alg(tuner)
    while alg is not None and not isinstance(alg, DistinctSearcher):
        alg = getattr(alg, "searcher", None)
    return alg


def _checkpoint_history(checkpoint: Any) -> list[dict[str, Any]]:
    """The per-epoch history stored beside a trial's latest checkpoint (local or remote storage)."""
    if checkpoint is None:
        return []
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HISTORY_FILE}") as fh:
            return read_history(fh.read().decode())
    except OSError:  # a checkpoint from before histories existed
        return []


def _row(result: Any, space: SearchSpace, metric: str, mode: str, overrides: dict[str, Any],
         interrupted: bool = False) -> TrialRow:  # fmt: skip
    """A leaderboard row from one Ray result. Epochs, best and last metrics come from the history that
    travels with the trial's latest checkpoint (every report carries one), not from Ray's
    ``result.json``, which can lose epochs when a trial is retried."""
    config = trial_config(space, result.config or {}, overrides)
    reported = dict(result.metrics or {})
    history = _checkpoint_history(result.checkpoint)
    last = dict(history[-1]) if history else reported
    epochs = int(last.get("epoch", 0) or 0)
    error = _first_line(result.error) if result.error is not None else ""
    return TrialRow(
        trial_id=str(reported.get("trial_id") or Path(result.path).name),
        status=TrialStatus.of(result.error is not None, epochs, expected_epochs(config), interrupted),
        summary=describe_pipeline(config), epochs=epochs, best=best_of([h.get(metric) for h in history], mode),
        last=last, path=str(result.path), error=error, config=config, params=dict(result.config or {}),
        history=history,
    )  # fmt: skip


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # Ray wraps the trial's exception; keep its last "Error: message" line.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line[:500]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _finish_parent_run(parent: SearchRun, uri: str, opts: SearchOptions, summary: SearchSummary, mode: str) -> None:
    """Final sweep: every child run gets what its trial could not log while MLflow was unreachable
    (from the trial's history) and its final status, also for trials of a resumed search; then the
    parent run's leaderboard, history, plots and best-trial tag. A tracking server that is down gets
    ``SPNTUNE_MLFLOW_WAIT_S`` seconds (default 120) to come back; what is still missing is listed in
    the summary."""
    wait_s = float(os.environ.get("SPNTUNE_MLFLOW_WAIT_S", "120"))
    if not wait_for_tracking(uri, wait_s):
        summary.tracking_notes.append(
            f"MLflow at {masked(uri)} did not answer for {wait_s:.0f} s: the trials' runs were not completed or "
            f"closed there; every result is in {summary.experiment_path} (leaderboard.csv, history.csv)"
        )
        return
    summary.tracking_notes += complete_trial_runs(uri, opts.experiment, parent.run_id, opts.name, summary.rows)
    experiment = summary.experiment_path
    files = {"leaderboard": write_leaderboard_html(summary, experiment / "leaderboard.html"),
             "leaderboard/history": experiment / "history.csv"}  # fmt: skip
    files |= {f"plots/{p.stem}": p for p in search_plots(opts.space, summary.rows, mode, experiment / "plots")}
    best = next((r for r in summary.rows if r.status is not TrialStatus.ERROR and not math.isnan(r.best)), None)
    # What DistinctSearcher did (over the whole search, resumes included)
    repeats = {"spntune.repeats_skipped": summary.repeats_skipped, "spntune.space_exhausted": summary.space_exhausted}
    tags = {k: str(v) for k, v in repeats.items()} if summary.repeats_skipped is not None else {}
    tags["spntune.trials"] = str(opts.trials)  # the run's trials param is the first budget; a resume may add
    parent.finish(experiment / "leaderboard.csv", files, best.trial_id if best else None,
                  "KILLED" if summary.interrupted else "FINISHED", tags)  # fmt: skip
    summary.parent_run_id, summary.tracking_uri = parent.run_id, uri
