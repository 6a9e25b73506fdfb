"""DistinctSearcher in front of the real OptunaSearch (TPE): no configuration is handed out twice."""

import optuna
import pytest
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.search_generator import SearchGenerator

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
    searcher = DistinctSearcher(inner, max_repeats=40)
    handed = _run_to_the_end(searcher, 0, 10)
    # the 2 x 2 space: four trials, all different, then FINISHED (and FINISHED from then on)
    assert len(handed) == 4 and len({config_key(c) for c in handed}) == 4
    assert searcher.exhausted and searcher.suggest("late") == Searcher.FINISHED
    # TPE was told an outcome for every repeat it proposed: each equals the original's score
    study = inner._ot_study
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4 + searcher.skipped and searcher.skipped >= 40  # the last 40 asks all repeats
    for t in finished:
        assert t.value == _score(t.params)


def test_repeats_of_running_trials_wait_for_their_outcome():
    inner = _optuna()
    searcher = DistinctSearcher(inner, max_repeats=40)
    running = {}
    for i in range(4):  # four trials at once: the whole space, while none has finished
        running[f"t{i}"] = searcher.suggest(f"t{i}")
    assert len({config_key(c) for c in running.values()}) == 4
    before = searcher.skipped  # repeats of running trials parked on the way
    # every proposal repeats a running trial: no new trial yet, but no end either (a trial may still fail)
    assert searcher.suggest("t4") is None and searcher.waiting and not searcher.exhausted
    assert sum(len(ids) for ids in searcher.parked.values()) == searcher.skipped == before + 40
    study = inner._ot_study
    asked = len(study.trials)
    assert asked == 4 + searcher.skipped
    assert searcher.suggest("t4") is None and len(study.trials) == asked  # waiting: TPE is not asked again
    assert all(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    first = next(iter(running))
    key = config_key(running[first])
    repeats = len(searcher.parked.get(key, []))
    searcher.on_trial_result(first, {"score": 0.0, "training_iteration": 1})
    searcher.on_trial_complete(first, {"score": _score(running[first]), "training_iteration": 2})
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert key not in searcher.parked and len(told) == 1 + repeats and not searcher.waiting
    assert {t.value for t in told} == {_score(running[first])}
    # the others fail: their parked repeats are told they failed, and nothing is kept to reuse
    failed = [config_key(running[t]) for t in list(running)[1:]]
    for trial_id in list(running)[1:]:
        searcher.on_trial_complete(trial_id, None, error=True)
    assert not searcher.parked and not searcher.running and list(searcher.done) == [key]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # so the failed configurations run again; the one that finished does not
    again = _run_to_the_end(searcher, 5, 12)
    assert sorted(config_key(c) for c in again) == sorted(failed) and searcher.exhausted


def test_a_failed_trial_runs_again_when_proposed_again():
    inner = _optuna()
    searcher = DistinctSearcher(inner, max_repeats=40)
    [first] = _run_to_the_end(searcher, 0, 1, error=True)
    handed = _run_to_the_end(searcher, 1, 8)
    assert first in handed  # it failed: nothing to reuse
    assert len({config_key(c) for c in handed}) == len(handed) == 4


def test_state_survives_the_search_checkpoint(tmp_path):
    """Through what Ray saves and restores on --resume: the search generator over a concurrency limiter over
    the wrapper (``save_to_dir`` / ``restore_from_dir``, each wrapper's ``get_state`` / ``set_state``)."""
    searcher = DistinctSearcher(_optuna(), max_repeats=40)
    generator = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"score": _score(config)})
    running = searcher.suggest("t1")
    assert searcher.suggest("t2") is not None
    searcher.on_trial_complete("t2", None, error=True)
    generator.save_to_dir(str(tmp_path), session_str="s")

    restored = DistinctSearcher(_optuna(seed=7), max_repeats=40)
    SearchGenerator(ConcurrencyLimiter(restored, max_concurrent=2)).restore_from_dir(str(tmp_path))
    assert restored is not searcher
    assert (restored.done, restored.running, restored.skipped) == (searcher.done, searcher.running, searcher.skipped)
    restored.on_trial_complete("t1", {"score": _score(running)})  # the trial that ran across the restart
    handed = [config, running, *_run_to_the_end(restored, 3, 10)]
    assert len(handed) == 4 and len({config_key(c) for c in handed}) == 4 and restored.exhausted


def test_max_repeats_must_be_positive():
    with pytest.raises(ValueError, match="max_repeats must be at least 1"):
        DistinctSearcher(_optuna(), max_repeats=0)
