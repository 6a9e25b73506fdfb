"""``ray_state.check_resumable`` on search folders laid out as Ray 2.60 writes them (no Ray here:
``test_search.py::test_smoke_search_two_trials`` damages the folder of a real search)."""

import json
import pickle
from pathlib import Path

import pytest

from spntune.errors import ConfigError
from spntune.ray_state import check_resumable

STAMP = "2026-12-07_08-55-18"


def _trial(trial_id: str, status: str, last_result: dict) -> list[str]:
    meta = {"trial_id": trial_id, "status": status, "relative_logdir": f"run_trial_{trial_id}_1"}
    return [json.dumps(meta), json.dumps({"last_result": last_result, "num_failures": 0})]


@pytest.fixture
def search(tmp_path: Path) -> Path:
    """A search with a finished trial, one that reported an epoch, and one that only started (no folder)."""
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    trials = [_trial("aaa", "TERMINATED", {"epoch": 2}), _trial("bbb", "RUNNING", {"epoch": 1}),
              _trial("ccc", "RUNNING", {})]  # fmt: skip
    (folder / f"experiment_state-{STAMP}.json").write_text(json.dumps({"trial_data": trials, "runner_data": "{}"}))
    (folder / f"searcher-state-{STAMP}.pkl").write_bytes(pickle.dumps({"study": 1}))
    (folder / f"search_gen_state-{STAMP}.json").write_bytes(pickle.dumps({"counter": 3}))
    for trial_id in ("aaa", "bbb"):
        (folder / f"run_trial_{trial_id}_1").mkdir()
    return folder


def test_an_intact_search_resumes_and_a_trial_that_only_started_needs_no_folder(search):
    check_resumable(search)


def test_a_search_that_never_saved_a_trial_resumes(tmp_path):
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({}))
    check_resumable(tmp_path)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [(lambda s: (s / "run_trial_aaa_1").rmdir(), r"the folders of trials aaa \(run_trial_aaa_1\) are gone"),
     (lambda s: (s / "run_trial_bbb_1").rmdir(), r"the folders of trials bbb"),  # reported an epoch
     (lambda s: (s / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1})[:-3]), r"tuner\.pkl cannot be read"),
     (lambda s: (s / f"experiment_state-{STAMP}.json").write_text('{"trial_data": [['), r"experiment_state-.* cannot"),
     (lambda s: (s / f"experiment_state-{STAMP}.json").write_text('{"trials": []}'), r"is not Ray's experiment state"),
     (lambda s: (s / f"searcher-state-{STAMP}.pkl").unlink(), r"searcher-state-\*\.pkl is missing"),
     (lambda s: (s / f"search_gen_state-{STAMP}.json").write_bytes(b"\x80\x05junk"), r"search_gen_state-.* cannot"),
     (lambda s: (s / f"callback-states-{STAMP}.pkl").write_bytes(b""), r"callback-states-.* cannot be read")],
    ids=["finished-trial-folder", "reported-trial-folder", "tuner", "state-json", "state-shape", "searcher",
         "search-gen", "callbacks"],
)  # fmt: skip
def test_damage_that_would_lose_trials_is_refused_naming_it(search, damage, expected):
    damage(search)
    with pytest.raises(ConfigError, match=rf"cannot resume the search at {search}: .*{expected}"):
        check_resumable(search)


def test_the_newest_state_is_the_one_checked(search):
    """Ray restores the newest of each file (max by name): an older damaged one does not matter."""
    (search / "experiment_state-2026-01-01_00-00-00.json").write_text("{broken")
    check_resumable(search)
    (search / "experiment_state-2027-01-01_00-00-00.json").write_text("{broken")
    with pytest.raises(ConfigError, match="experiment_state-2027"):
        check_resumable(search)
