"""DistinctSearcher in front of the real OptunaSearch (TPE): no configuration is handed out twice."""

import optuna
import pytest
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from spntune.distinct import DistinctSearcher, config_key


def _space(trial: optuna.Trial) -> None:
    trial.suggest_categorical("kind", ["cspn", "dyspn"])
    trial.suggest_categorical("kernel_size", [3, 5])


def _optuna(seed: int = 0) -> OptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=2)
    return OptunaSearch(space=_space, metric="score", mode="max", sampler=sampler)


def _score(config: dict) -> float:
    return {"cspn": 1.0, "dyspn": 2.0}[config["kind"]] + config["kernel_size"] / 10


def _run_to_the_end(searcher: DistinctSearcher, first: int, last: int, error: bool = False) -> list[dict]:
    """Trials ``t<first>`` .. ``t<last - 1>`` one at a time, each scored (or failed, ``error``) before the next
    is asked for, until the searcher says FINISHED; the configurations handed out."""
    handed = []
    for i in range(first, last):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        handed.append(config)
        searcher.on_trial_complete(f"t{i}", None if error else {"score": _score(config), "training_iteration": 1},
                                   error=error)  # fmt: skip
    return handed


def test_config_key_ignores_key_order():
    assert config_key({"a": 1, "b": {"c": 2, "d": 3}}) == config_key({"b": {"d": 3, "c": 2}, "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 1.5})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_configuration_runs_once_then_the_search_ends(seed):
    inner = _optuna(seed)
    searcher = DistinctSearcher(inner, max_repeats=10)
    handed = _run_to_the_end(searcher, 0, 10)
    # the 2 x 2 space: four trials, all different, then FINISHED (and FINISHED from then on)
    assert len(handed) == 4 and len({config_key(c) for c in handed}) == 4
    assert searcher.exhausted and searcher.suggest("late") == Searcher.FINISHED
    # TPE was told an outcome for every repeat it proposed: each equals the original's score
    study = inner._ot_study
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4 + searcher.skipped and searcher.skipped >= 10
    for t in finished:
        assert t.value == _score(t.params)


def test_a_repeat_of_a_running_trial_learns_its_outcome_when_it_ends():
    inner = _optuna()
    searcher = DistinctSearcher(inner, max_repeats=10)
    running = {}
    for i in range(4):  # four trials at once: the whole space, while none has finished
        running[f"t{i}"] = searcher.suggest(f"t{i}")
    assert len({config_key(c) for c in running.values()}) == 4
    assert searcher.suggest("t4") == Searcher.FINISHED  # every proposal repeats a running trial
    parked = sum(len(ids) for ids in searcher.parked.values())
    assert parked == searcher.skipped > 0
    study = inner._ot_study
    assert all(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    first = next(iter(running))
    key = config_key(running[first])
    repeats = len(searcher.parked.get(key, []))
    searcher.on_trial_result(first, {"score": 0.0, "training_iteration": 1})
    searcher.on_trial_complete(first, {"score": _score(running[first]), "training_iteration": 2})
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert key not in searcher.parked and len(told) == 1 + repeats
    assert {t.value for t in told} == {_score(running[first])}
    # the others fail: their parked repeats are told they failed, and nothing is kept to reuse
    for trial_id in list(running)[1:]:
        searcher.on_trial_complete(trial_id, None, error=True)
    assert not searcher.parked and not searcher.running
    assert list(searcher.done) == [key]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_a_failed_trial_runs_again_when_proposed_again():
    inner = _optuna()
    searcher = DistinctSearcher(inner, max_repeats=40)
    [first] = _run_to_the_end(searcher, 0, 1, error=True)
    handed = _run_to_the_end(searcher, 1, 8)
    assert first in handed  # it failed: nothing to reuse
    assert len({config_key(c) for c in handed}) == len(handed) == 4


def test_state_survives_a_checkpoint(tmp_path):
    """What Ray's search generator saves for a wrapper (``get_state``) and the wrapped searcher's own file."""
    searcher = DistinctSearcher(_optuna(), max_repeats=10)
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"score": _score(config)})
    running = searcher.suggest("t1")
    state = searcher.get_state()
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = DistinctSearcher(_optuna(), max_repeats=10)
    restored.set_state(state)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.done == searcher.done and restored.running == searcher.running
    restored.on_trial_complete("t1", {"score": _score(running)})  # the trial that ran across the restart
    handed = [config, running, *_run_to_the_end(restored, 2, 8)]
    assert len(handed) == 4 and len({config_key(c) for c in handed}) == 4


def test_max_repeats_must_be_positive():
    with pytest.raises(ValueError, match="max_repeats must be at least 1"):
        DistinctSearcher(_optuna(), max_repeats=0)
