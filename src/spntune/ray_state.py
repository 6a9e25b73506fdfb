"""What ``spntune search --resume`` needs from a search's folder, checked before Ray reads it.

``Tuner.restore`` reads ``tuner.pkl`` (the trainable, the search algorithm, the scheduler, the callbacks),
then the newest of each: ``experiment_state-*.json`` (every trial: config, status, folder, last result),
``searcher-state-*.pkl`` and ``search_gen_state-*.json`` (both pickles: the search algorithm's state, i.e.
Optuna's study, what ``DistinctSearcher`` saw, the budget) and ``callback-states-*.pkl`` (ASHA's rungs, from
``tune.SchedulerState``; written only where a callback has state).
Where the experiment state cannot be read, Ray 2.60 logs "Failed to restore the run state" and starts the
search over: its finished trials drop out of the results and ``leaderboard.csv`` is rewritten without them.
Without the searcher's state it proposes trials beyond the budget; without a trial's folder that trial's
metrics are gone and the leaderboard ranks it last. So each is checked here and a resume that would lose
trials is refused, naming the file. Light on purpose (no Ray): runs under the search's lock before Ray starts.
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path
from typing import Any, NoReturn

from spntune.errors import ConfigError

__all__ = ["check_resumable"]

#: Ray's file names (ray.tune: TuneController, SearchGenerator, Searcher, CallbackList), newest = max(name).
EXPERIMENT_STATE = "experiment_state-*.json"
SEARCHER_STATE = "searcher-state-*.pkl"
SEARCH_GEN_STATE = "search_gen_state-*.json"
CALLBACK_STATES = "callback-states-*.pkl"


def check_resumable(experiment: Path) -> None:
    """Refuse a resume of the search at ``experiment`` whose Ray state is damaged or incomplete.

    Raises:
        ConfigError: naming the file or the trial folders, what is wrong, and what to do.
    """
    _whole_pickle(experiment / "tuner.pkl", experiment)
    state_file = _newest(experiment, EXPERIMENT_STATE)
    if state_file is None:  # stopped before Ray saved any trial: nothing to lose
        return
    trials = _trials(state_file, experiment)
    for pattern in (SEARCHER_STATE, SEARCH_GEN_STATE):  # pickles, the .json one too
        path = _newest(experiment, pattern)
        if path is None:
            _refuse(experiment, f"{experiment / pattern} is missing (Ray writes it with {state_file.name})")
        _whole_pickle(path, experiment)
    path = _newest(experiment, CALLBACK_STATES)  # only where a callback had state (ASHA's rungs)
    if path is not None:
        _whole_pickle(path, experiment)
    gone = [t for t in trials if t["results"] and not (experiment / t["relative_logdir"]).is_dir()]
    if gone:
        names = ", ".join(f"{t['trial_id']} ({t['relative_logdir']})" for t in gone)
        raise ConfigError(
            f"cannot resume the search at {experiment}: the folders of trials {names} are gone, and with them their "
            "results and checkpoints; put them back (e.g. from a copy), or start a new search (another --name)"
        )


def _newest(experiment: Path, pattern: str) -> Path | None:
    return max(experiment.glob(pattern), key=lambda p: p.name, default=None)


def _refuse(experiment: Path, what: str) -> NoReturn:
    raise ConfigError(
        f"cannot resume the search at {experiment}: {what}. Ray would start the search over or lose track of its "
        "trials; put the file back as it was (e.g. from a copy), or start a new search (another --name)"
    )


def _whole_pickle(path: Path, experiment: Path) -> None:
    """The file holds one whole pickle (its opcodes run to STOP), read without unpickling anything."""
    try:
        data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
    except (OSError, ValueError) as exc:
        _refuse(experiment, f"{path} cannot be read ({exc})")


def _json(path: Path, experiment: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _refuse(experiment, f"{path} cannot be read ({exc})")


def _trials(state_file: Path, experiment: Path) -> list[dict[str, Any]]:
    """Each trial's id, status, folder (relative to the search's) and whether it has results (ended, or
    reported): a trial that only started may have no folder yet, and Ray runs it again from the start."""
    state = _json(state_file, experiment)
    trials = []
    try:
        for meta, runtime in state["trial_data"]:
            trial = json.loads(meta)
            try:  # (unreadable: Ray's restore fails on it, and _RestoreGuard stops the resume)
                reported = bool(json.loads(runtime).get("last_result"))
            except (ValueError, AttributeError):
                reported = False
            trials.append({key: str(trial[key]) for key in ("trial_id", "status", "relative_logdir")}
                          | {"results": reported or trial["status"] in ("TERMINATED", "ERROR")})  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        _refuse(experiment, f"{state_file} is not Ray's experiment state ({type(exc).__name__}: {exc})")
    return trials
