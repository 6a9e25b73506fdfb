"""The options of a search, and every check that can refuse them before Ray starts or anything is
written (``check_search``). Light on purpose: ``spntune search`` refuses bad flags, spaces and data
roots in well under a second, before it imports torch, Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import socket
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spntune import allocator
from spntune.config import ConfigError, TrialConfig, check_data_root
from spntune.data.listing import check_listing
from spntune.leaderboard import TRIAL_METRICS, is_trial_metric, metric_mode
from spntune.ray_state import check_resumable
from spntune.space import BUILTIN_SPACES, SearchSpace, builtin_space_path, load_space

__all__ = ["KEPT_ON_RESUME", "OBJECTIVES", "SETTINGS_FILE", "SearchOptions", "check_search",
           "check_storage", "grow_settings", "read_settings", "resumed", "search_lock", "write_settings"]  # fmt: skip

#: Objective names -> (metric, mode). ``latency`` is measured inference ms per image.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "miou": ("refined_miou", "max"),
    "latency": ("infer_ms_per_image", "min"),
}


#: The settings a search started with, in its folder (``write_settings``): what ``--resume`` keeps.
SETTINGS_FILE = "spntune_search.json"

#: What a resumed search keeps from its start, ``SearchOptions`` field -> the flag that sets it. Ray restores
#: the searcher (space, metric, objectives, seed), the scheduler, the concurrency limit, the retries, the
#: resources and the callbacks (tracking) from the search's own state, and every trial of a search runs
#: one space with the same ``--set`` keys; a flag that asks otherwise on ``--resume`` would be ignored, so
#: it is refused instead (``resumed``). ``--trials`` may grow on a resume: the search runs the new trials.
KEPT_ON_RESUME: dict[str, str] = {
    "space": "--space", "concurrency": "--concurrency", "gpus_per_trial": "--gpus-per-trial",
    "cpus_per_trial": "--cpus-per-trial", "scheduler": "--scheduler", "grace_period": "--grace-period",
    "reduction_factor": "--reduction-factor", "metric": "--metric", "objectives": "--objective",
    "max_failures": "--max-failures", "overrides": "--set", "seed": "--seed",
    "tracking_uri": "--tracking-uri / --no-mlflow", "experiment": "--experiment", "viz": "--no-viz",
}  # fmt: skip


@dataclass
class SearchOptions:
    """A search's options. On ``resume`` every field of ``KEPT_ON_RESUME`` must match the search's settings,
    and ``trials`` is the search's new total: more than it had grows it (code that resumes a search passes
    the budget it wants, as the CLI does after ``resumed``)."""

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
    retry_errored: bool = False  # with resume: errored trials run again from their last checkpoint
    max_failures: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    top: int = 10
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or ./mlflow_runs; "none": no MLflow
    experiment: str = "spntune"
    viz: bool = True
    space_file: Path | None = None

    @property
    def experiment_path(self) -> Path:
        return self.storage.resolve() / self.name

    def objective_list(self) -> list[tuple[str, str]]:
        """``(metric, mode)`` per objective; ``miou`` follows ``--metric`` and the space's mode."""
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ConfigError(
                f"--objective takes {', '.join(OBJECTIVES)} joined by ',', got {','.join(self.objectives)}"
            )
        metric = self.metric or self.space.metric
        if not is_trial_metric(metric):
            raise ConfigError(
                f"--metric {metric!r} is not a metric trials report; valid: {', '.join(TRIAL_METRICS)}, "
                "coarse_iou_<class>, refined_iou_<class>, refined_miou_t<step>, and final_<any of these> (original size)"
            )
        mode = self.space.mode if metric == self.space.metric else metric_mode(metric)
        return [(metric, mode) if o == "miou" else OBJECTIVES[o] for o in self.objectives]


def check_search(opts: SearchOptions) -> list[tuple[str, str]]:
    """Everything that can be refused before Ray starts or anything is written; returns the objectives."""
    ranges = [("--trials", opts.trials, opts.trials >= 1, "an integer >= 1"),
              ("--concurrency", opts.concurrency, opts.concurrency >= 1, "an integer >= 1"),
              ("--cpus-per-trial", opts.cpus_per_trial, 0 < opts.cpus_per_trial < math.inf, "a number > 0"),
              ("--gpus-per-trial", opts.gpus_per_trial, 0 <= opts.gpus_per_trial < math.inf,
               "a number >= 0 (0.5 = half a GPU)"),
              ("--grace-period", opts.grace_period, opts.grace_period >= 1, "an integer >= 1 (epochs)"),
              ("--reduction-factor", opts.reduction_factor, 1 < opts.reduction_factor < math.inf, "a finite number > 1"),
              ("--max-failures", opts.max_failures, opts.max_failures >= 0, "an integer >= 0"),
              ("--seed", opts.seed, 0 <= opts.seed < 2**32, "an integer in 0 .. 2**32 - 1 (Optuna's and NumPy's range)"),
              ("--top", opts.top, opts.top >= 1, "an integer >= 1")]  # fmt: skip
    bad = [f"{flag} must be {expected}, got {value}" for flag, value, ok, expected in ranges if not ok]
    if opts.retry_errored and not opts.resume:
        bad.append("--retry-errored continues the errored trials of a search: use it with --resume")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", opts.name):
        bad.append(f"--name must be a folder name of at most 200 characters (letters, digits, '.', '_', '-'), got "
                   f"{opts.name if len(opts.name) <= 60 else opts.name[:60] + '...'!r}")  # fmt: skip
    try:
        allocator.enabled()  # SPNTUNE_MALLOC_REUSE, which the Ray workers are started with
    except ConfigError as exc:
        bad.append(str(exc))
    if bad:
        raise ConfigError("; ".join(bad))
    objectives = opts.objective_list()
    if opts.resume:  # the options (after resumed()) are the search's own: any other is refused
        resumed(opts, given=KEPT_ON_RESUME.keys() | {"trials"})
    _check_resources(opts)
    opts.space.check_overrides(opts.overrides)  # every branch of the space with --set applied, as trials get it
    data = TrialConfig.from_dict({**opts.space.to_trial_config({}), **opts.overrides}).data
    check_data_root(data)
    check_storage(opts)
    # Last: the dataset of the space's base config (with --set), listed as every trial will list it (no torch):
    # a missing split, an image without a mask or a bad classes.txt is named before Ray starts. (Images are
    # decoded only by the trials, which name a file that cannot be read.)
    check_listing(data)
    return objectives


def check_storage(opts: SearchOptions, locked: bool = False) -> None:
    """The storage folder is writable, and the search's folder exists exactly when ``--resume`` says so.
    ``run_search`` repeats this once it holds the search's lock (``locked``): another process may have started
    or removed a search of that name since the first check. Before that, the lock is probed (a running search
    is refused as running), and a resumed folder must hold Ray's state whole (``ray_state``)."""
    experiment = opts.experiment_path
    existing = next(p for p in (experiment, *experiment.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--storage {opts.storage}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--storage {opts.storage}: cannot write under {existing} (no permission)")
    if not locked:
        _refuse_if_running(opts)
    if opts.resume and not experiment.is_dir():
        raise ConfigError(f"nothing to resume: no search at {experiment}")
    # After the lock (held, or probed just above): a search that runs now has not always written its state
    # yet, and the lock's refusal ("running now") is the one that says what is going on
    if opts.resume and not (experiment / "tuner.pkl").is_file():
        raise ConfigError(
            f"nothing to resume at {experiment}: it holds no search state (Ray's tuner.pkl), so that search never "
            "got to start; remove the folder to start it again, or use another --name"
        )
    if opts.resume:
        check_resumable(experiment)
    if not opts.resume and experiment.exists():
        raise ConfigError(
            f"a search named {opts.name!r} already exists at {experiment}; use --resume or another --name"
        )


@contextmanager
def search_lock(opts: SearchOptions) -> Iterator[None]:
    """Holds ``STORAGE/.NAME.lock`` (an exclusive ``flock``) while a search runs, so a second search of
    the same name in the same storage (or a ``--resume`` of a running one) is refused instead of
    writing into the first one's folder. The kernel drops the lock when the holder dies, even by
    SIGKILL, so a crashed search never leaves a stale lock behind."""
    storage = opts.storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    with (storage / f".{opts.name}.lock").open("a+") as fh:
        _take_lock(fh, opts)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield  # the lock goes with the file's close


def _take_lock(fh: Any, opts: SearchOptions) -> None:
    """``flock`` the open lock file, or refuse naming the search's holder (pid and host)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        raise ConfigError(
            f"the search {opts.name!r} in {opts.storage} is running now ({holder}); "
            "wait for it to end (then --resume it if it was interrupted), or use another --name"
        ) from None


def _refuse_if_running(opts: SearchOptions) -> None:
    """A search of this name that runs now is refused at once, before torch and Ray are imported (``search_lock``
    refuses it again, for certain, once they are). Only an existing lock file is opened: nothing is written."""
    path = opts.storage.resolve() / f".{opts.name}.lock"
    try:
        fh = path.open("r")
    except OSError:  # no lock file: no search of that name has run here
        return
    with fh:
        _take_lock(fh, opts)  # released as the file closes


def _check_resources(opts: SearchOptions) -> None:
    """A trial that asks for more than this machine has would wait forever: refuse it. On a cluster
    (``--address HOST:PORT``) the head must be listening (Ray itself retries for minutes)."""
    if opts.address and opts.address != "auto":
        host, _, port = opts.address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--address takes auto or HOST:PORT (e.g. 10.0.0.5:6379), got {opts.address!r}")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(
                f"--address {opts.address}: no Ray head answers there ({exc.strerror or exc}); "
                "start one with `ray start --head` or check the address"
            ) from None
        return  # a cluster's GPUs may still be on their way (autoscaling)
    cpus = os.cpu_count() or 1
    if opts.cpus_per_trial > cpus:
        raise ConfigError(f"--cpus-per-trial {opts.cpus_per_trial:g}: this machine has {cpus} CPUs")
    if opts.gpus_per_trial <= 0:
        return
    gpus = _gpu_count()
    if opts.gpus_per_trial > gpus:
        raise ConfigError(
            f"--gpus-per-trial {opts.gpus_per_trial:g}: this machine has {gpus} GPU{'s' * (gpus != 1)}, so no "
            "trial could ever start; use 0 here, or --address to run on a cluster with GPUs"
        )


def _gpu_count() -> int:
    """The GPUs torch sees; 0 without importing torch (seconds) where no GPU driver shows a device file
    (CUDA's /dev/nvidia*, WSL2's /dev/dxg, Jetson's /dev/nvhost-*, ROCm's /dev/kfd): a refusal on a machine
    without GPUs answers at once."""
    dev = Path("/dev")
    if not any(any(dev.glob(pattern)) for pattern in ("nvidia*", "dxg", "nvhost-*", "nvmap", "kfd")):
        return 0
    import torch  # only a search that asks for GPUs on a machine with a GPU driver pays for counting them

    return torch.cuda.device_count()


def _space_ref(opts: SearchOptions) -> tuple[str, str | None]:
    """How the settings name the space (a built-in's name, else the file's absolute path) and the sha256
    of its file (None where there is no file: a space built in code)."""
    path = opts.space_file
    if path is None or not path.is_file():
        return opts.space.name, None
    digest = _file_sha256(path)
    builtin = next((n for n in BUILTIN_SPACES if builtin_space_path(n).resolve() == path.resolve()), None)
    return builtin or str(path.resolve()), digest


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings): settings compare so."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def settings(opts: SearchOptions) -> dict[str, Any]:
    """What ``write_settings`` records: the trial budget, and every ``KEPT_ON_RESUME`` option."""
    space, digest = _space_ref(opts)
    kept = {key: _jsonable(getattr(opts, key)) for key in KEPT_ON_RESUME if key != "space"}
    return {"version": 1, "trials": opts.trials, "space": space, "space_sha256": digest, **kept}


def write_settings(opts: SearchOptions) -> None:
    """Record a new search's settings in its folder, as it starts."""
    _write(opts.experiment_path, settings(opts))


def grow_settings(experiment: Path, trials: int) -> None:
    """Record a resume's larger trial budget; every other setting stays as the search started (the space's
    file among them, even where the resume named a copy of it)."""
    stored = read_settings(experiment)
    if stored is not None:
        _write(experiment, {**stored, "trials": trials})


def _write(experiment: Path, record: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path = experiment / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SETTINGS_FILE}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only there when the write or the rename failed


def read_settings(experiment: Path) -> dict[str, Any] | None:
    """The settings recorded in a search's folder; None for a search started before they were recorded."""
    path = experiment / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the search's settings {path}: {exc}") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} is not a search's settings file (a JSON object)")
    missing = [key for key in ("trials", "space", "space_sha256", *KEPT_ON_RESUME) if key not in stored]
    if missing:
        raise ConfigError(f"{path} is not a search's settings file (missing {', '.join(missing)})")
    bad = [f"{key} is {json.dumps(stored[key])}, expected {expected}" for key, (ok, expected) in _SETTING_CHECKS.items()
           if not ok(stored[key])]  # fmt: skip
    if bad:
        raise ConfigError(
            f"the search's settings {path} were changed by hand: {'; '.join(bad)}. spntune search wrote them as "
            "the search started: put those values back, or start a new search (another --name)"
        )
    return stored


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


#: What each recorded setting must be (``read_settings``): key -> (test, what it expects).
_SETTING_CHECKS: dict[str, tuple[Any, str]] = {
    "trials": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "space": (lambda v: isinstance(v, str) and bool(v), "a space's name or file"),
    "space_sha256": (lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None),
                     "null or a sha256 in hex"),
    "concurrency": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "gpus_per_trial": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "cpus_per_trial": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "scheduler": (lambda v: v in ("asha", "none"), '"asha" or "none"'),
    "grace_period": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "reduction_factor": (lambda v: _is_number(v) and v > 1, "a number > 1"),
    "metric": (_is_str_or_none, "null or a metric's name"),
    "objectives": (lambda v: isinstance(v, list) and bool(v) and all(o in OBJECTIVES for o in v),
                   f"a list of {', '.join(OBJECTIVES)}"),
    "max_failures": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "overrides": (lambda v: isinstance(v, dict), "an object of config keys"),
    "seed": (_is_int, "an integer"),
    "tracking_uri": (_is_str_or_none, "null or an MLflow URI"),
    "experiment": (lambda v: isinstance(v, str) and bool(v), "an MLflow experiment's name"),
    "viz": (lambda v: isinstance(v, bool), "true or false"),
}  # fmt: skip


def _stored_space(stored: dict[str, Any], experiment: Path) -> tuple[SearchSpace, Path]:
    ref = stored["space"]
    path = builtin_space_path(ref) if ref in BUILTIN_SPACES else Path(ref)
    if not path.is_file():
        raise ConfigError(
            f"the search at {experiment} ran the space {ref}, which is gone; pass --space with that space's file"
        )
    # (no sha: a search started from code with a space of no file; its name is all there is to go by)
    if stored["space_sha256"] is not None and _file_sha256(path) != stored["space_sha256"]:
        raise ConfigError(
            f"the space file {path} changed since the search at {experiment} started; its trials must all come "
            "from one space: put the file back as it was, or start a new search (another --name)"
        )
    return load_space(path), path


def resumed(opts: SearchOptions, given: Collection[str]) -> SearchOptions:
    """The options of ``--resume``: what the user did not give (``given``: ``SearchOptions`` fields set on
    the command line) comes from the settings the search started with, what they gave must match them,
    and ``--trials`` may grow (never shrink). A search from before settings were recorded resumes with
    its options unchecked, as it always did.

    Raises:
        ConfigError: naming every flag that differs from the search's own setting, and both values.
    """
    experiment = opts.experiment_path
    stored = read_settings(experiment) if opts.resume else None
    if stored is None:
        return opts
    changes: dict[str, Any] = {}
    bad = []
    if "space" in given:
        ref, digest = _space_ref(opts)
        same = digest == stored["space_sha256"] if stored["space_sha256"] is not None else ref == stored["space"]
        if not same:
            bad.append(f"--space {ref} is not the space this search ran ({stored['space']}"
                       + (", changed since" if ref == stored["space"] else "") + ")")  # fmt: skip
    else:
        changes["space"], changes["space_file"] = _stored_space(stored, experiment)
    for key, flag in KEPT_ON_RESUME.items():
        if key == "space":
            continue
        if key not in given:
            changes[key] = stored[key]
        elif (value := _jsonable(getattr(opts, key))) != stored[key]:
            bad.append(_difference(key, flag, value, stored[key]))
    if "trials" not in given:
        changes["trials"] = stored["trials"]
    elif opts.trials < stored["trials"]:
        bad.append(f"--trials {opts.trials}: the search has {stored['trials']}; a resume can add trials, not drop them")
    if bad:
        raise ConfigError(
            f"--resume continues the search at {experiment} with the settings it started with: "
            + "; ".join(bad)
            + ". Leave these flags out to keep them, or start a new search (another --name)"
        )
    return dataclasses.replace(opts, **changes)  # (read_settings parses the file afresh: nothing is shared)


def _difference(key: str, flag: str, value: Any, stored: Any) -> str:
    """One refused flag of a resume, in the words of its flag: what it asks, what the search has."""
    if key == "overrides":
        changed = [f"{k}={value[k]} where the search has {k}={stored[k]}" for k in sorted(value) if k in stored
                   and value[k] != stored[k]]  # fmt: skip
        added = [f"{k}={value[k]}, which the search does not set" for k in sorted(value) if k not in stored]
        missing = sorted(set(stored) - set(value))
        left = [f"without {', '.join(missing)}, which the search sets"] if missing else []
        return "--set (and --smoke-test): " + "; ".join(changed + added + left)
    if key == "viz":
        return (
            "--no-viz, where the search draws mask pictures"
            if not value
            else "mask pictures, where the search has --no-viz"
        )
    if key == "tracking_uri":
        asked = (
            "--no-mlflow" if value == "none" else f"--tracking-uri {value}" if value else "MLflow at the default URI"
        )
        had = "no MLflow" if stored == "none" else f"MLflow at {stored}" if stored else "MLflow at the default URI"
        return f"{asked}, where the search tracks {had}"
    shown = {"objectives": lambda v: ",".join(v)}.get(key, lambda v: "(default)" if v is None else str(v))
    return f"{flag} {shown(value)} where the search has {shown(stored)}"
