"""ASHA's rungs survive ``--resume`` (``tune.SchedulerState``): Ray checkpoints the searcher and the callbacks,
not the scheduler. Without Ray running: a real ``ASHAScheduler`` fed results, and real Tuners written and
restored. ``test_search.py::test_a_finished_search_grows_with_more_trials`` checks it through a real search."""

from types import SimpleNamespace

import cloudpickle
import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from spntune.search_options import SearchOptions
from spntune.space import builtin_space_path, load_space
from spntune.tune import SchedulerState, _tuner


def _asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="training_iteration", metric="refined_miou", mode="max", max_t=1000,
                         grace_period=1, reduction_factor=2)  # fmt: skip


def _report(scheduler: ASHAScheduler, trial_id: str, miou: float) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"training_iteration": 1, "refined_miou": miou})


def test_a_restored_scheduler_judges_new_trials_by_the_old_ones():
    before = _asha()
    for i, miou in enumerate([0.50, 0.55, 0.60, 0.65]):  # each above the rung so far: all go on
        assert _report(before, f"old{i}", miou) == TrialScheduler.CONTINUE
    saved = cloudpickle.loads(cloudpickle.dumps(SchedulerState(before).get_state()))  # as Ray's checkpoint holds it

    restored = _asha()  # what a resumed search unpickles from tuner.pkl: the scheduler as it was built
    SchedulerState(restored).set_state(saved)
    assert _report(restored, "new", 0.40) == TrialScheduler.STOP  # below the old trials' rung
    assert _report(_asha(), "new", 0.40) == TrialScheduler.CONTINUE  # what Ray alone did: an empty rung
    assert _report(restored, "good", 0.70) == TrialScheduler.CONTINUE


def test_a_fifo_scheduler_has_no_state_to_keep():
    assert SchedulerState(FIFOScheduler()).get_state() is None


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # group TPE, as run_search ignores it
def test_a_restored_search_callback_holds_the_restored_scheduler(tmp_path):
    """The callback and the scheduler come back from one tuner.pkl as one object graph: the callback's
    set_state reaches the scheduler the resumed search runs."""
    opts = SearchOptions(space=load_space("smoke"), space_file=builtin_space_path("smoke"), name="s",
                         storage=tmp_path, trials=2)  # fmt: skip
    objectives = opts.objective_list()
    first = _tuner(opts, {}, objectives, [])  # writes tuner.pkl, as a new search does before fit
    assert (tmp_path / "s" / "tuner.pkl").is_file()
    built = [c for c in first._local_tuner._run_config.callbacks if isinstance(c, SchedulerState)]
    assert len(built) == 1 and built[0].scheduler is first._local_tuner._tune_config.scheduler

    again = _tuner(SearchOptions(**{**opts.__dict__, "resume": True}), {}, objectives, [])
    restored = [c for c in again._local_tuner._run_config.callbacks if isinstance(c, SchedulerState)]
    scheduler = again._local_tuner._tune_config.scheduler
    assert len(restored) == 1 and restored[0].scheduler is scheduler and scheduler is not built[0].scheduler
    assert isinstance(scheduler, ASHAScheduler)
