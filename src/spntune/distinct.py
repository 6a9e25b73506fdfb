"""A search never trains the same configuration twice: ``DistinctSearcher`` wraps the search algorithm.

TPE re-proposes configurations it has already tried, the more often the fewer distinct configurations a
space has: a space of choices and integers only (a refinement-only search over refiner kind, kernel size,
iterations and affinity network) soon runs out of new ones. Each repeat would train a trial whose outcome
is known (a trial is a pure function of its config: it seeds itself).

When the wrapped searcher proposes a configuration that a trial of this search has already run, the
wrapper tells the searcher that trial's outcome for the repeat (so TPE learns from it as if it had run)
and asks again, under a fresh internal id; the Ray trial gets the first configuration not run before.
A repeat of a trial still running is parked and told that trial's outcome when it ends (a failure, where it
fails). One ``suggest`` asks at most ``max_repeats`` times:

- where every one of them repeated a *finished* trial, the space counts as exhausted: the wrapper returns
  ``FINISHED`` and the search ends with the trials it has (``exhausted`` says so);
- where some repeated a trial still running, the wrapper waits: it returns None (Ray asks again later) and
  asks the searcher nothing more until a trial ends, since a running trial may still fail and leave its
  configuration to run again.

What a repeat is told is the finished trial's last result (its metrics: the same values Ray gave the
searcher for the original, early-stopped or not). A trial that failed leaves nothing to reuse: a repeat of
it runs again. Repeats told count as finished trials in Optuna's study, so on a small space TPE leaves its
random start-up phase (``n_startup_trials``) after fewer distinct configurations. The wrapper's state
travels in the search's checkpoints (``get_state`` / ``set_state``, as Ray's ``ConcurrencyLimiter``), so a
resumed search still knows what ran.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from ray.tune.search import Searcher

__all__ = ["DistinctSearcher", "config_key"]

log = logging.getLogger("spntune.distinct")


def config_key(config: dict[str, Any]) -> str:
    """A configuration as canonical JSON (keys sorted): equal configurations, equal keys."""
    return json.dumps(config, sort_keys=True, default=repr)


class DistinctSearcher(Searcher):
    """Wraps ``searcher``; proposes each configuration at most once per search (module docstring)."""

    def __init__(self, searcher: Searcher, max_repeats: int = 50) -> None:
        if max_repeats < 1:
            raise ValueError(f"max_repeats must be at least 1, got {max_repeats}")
        self.searcher = searcher
        self.max_repeats = max_repeats
        self.done: dict[str, dict[str, Any]] = {}  # config key -> the finished trial's metrics
        self.running: dict[str, tuple[str, str]] = {}  # Ray trial id -> (id the searcher knows, config key)
        self.parked: dict[str, list[str]] = {}  # config key -> repeats waiting for the running original
        self.skipped = 0  # repeats not run
        self.exhausted = False
        self.waiting = False  # a suggest found only repeats, some of running trials: wait for one to end
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.exhausted:
            return Searcher.FINISHED
        if self.waiting:  # every recent proposal repeated a running trial: nothing new until one ends
            return None
        ran_only = True  # every proposal so far repeated a finished trial
        for repeat in range(self.max_repeats):
            ask_id = trial_id if repeat == 0 else f"{trial_id}~repeat{self.skipped}"  # skipped only grows: unique
            config = self.searcher.suggest(ask_id)
            if config is None or config == Searcher.FINISHED:
                return config
            key = config_key(config)
            if key in self.done:  # ran: the searcher learns its outcome again
                self.searcher.on_trial_complete(ask_id, result=dict(self.done[key]))
            elif any(k == key for _, k in self.running.values()):  # running: learns it when it ends
                self.parked.setdefault(key, []).append(ask_id)
                ran_only = False
            else:
                self.running[trial_id] = (ask_id, key)
                return config
            self.skipped += 1
            log.info("not running %s again: a trial of this search ran it or runs it", key)
        if not ran_only:
            self.waiting = True
            return None
        self.exhausted = True
        log.info(  # the search's summary says so too
            "ending the search: the last %d configurations proposed had all run already (the space has "
            "few distinct configurations)",
            self.max_repeats,
        )
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.running:
            self.searcher.on_trial_result(self.running[trial_id][0], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.running:
            return
        ask_id, key = self.running.pop(trial_id)
        self.waiting = False
        self.searcher.on_trial_complete(ask_id, result=result, error=error)
        kept = self._metrics(result) if result and not error else None
        if kept is not None:
            self.done[key] = kept
        for parked_id in self.parked.pop(key, []):
            self.searcher.on_trial_complete(parked_id, result=dict(kept) if kept else None, error=kept is None)

    def _metrics(self, result: dict) -> dict[str, Any] | None:
        """The values the searcher reads from a result: its metric(s), where present."""
        names = self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
        kept = {name: result[name] for name in names if name in result}
        return kept if len(kept) == len(names) else None

    def on_pause(self, trial_id: str) -> None:  # schedulers that pause trials (BOHB), via ConcurrencyLimiter
        if trial_id in self.running and hasattr(self.searcher, "on_pause"):
            self.searcher.on_pause(self.running[trial_id][0])

    def on_unpause(self, trial_id: str) -> None:
        if trial_id in self.running and hasattr(self.searcher, "on_unpause"):
            self.searcher.on_unpause(self.running[trial_id][0])

    def add_evaluated_point(self, parameters: dict, value: float, error: bool = False, pruned: bool = False,
                            intermediate_values: list[float] | None = None) -> None:  # fmt: skip
        self.searcher.add_evaluated_point(parameters, value, error, pruned, intermediate_values)

    def get_state(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
