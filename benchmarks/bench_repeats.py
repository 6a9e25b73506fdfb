"""Repeated configurations: how many of a search's trials TPE would spend on configurations it already ran,
and how many ``DistinctSearcher`` (``spntune/distinct.py``) spends.

A refinement-only space of choices (refiner kind; kernel size, iterations and affinity network per kind:
18 CSPN + 12 DySPN = 30 configurations), searched with ``--trials`` trials by the sampler every
``spntune search`` uses (``tune.tpe_sampler``) through Ray Tune's ``OptunaSearch``, one trial at a time,
for ``--seeds`` sampler seeds. No training: a trial's score is a fixed function of its configuration plus
a little noise (the sampler's choices depend on it, the count of repeats is the point). Prints, per seed and
in all: the trials that repeat a configuration run before, with TPE alone and behind ``DistinctSearcher``,
and the distinct configurations each covers.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from typing import Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from spntune.distinct import DistinctSearcher, config_key
from spntune.tune import tpe_sampler

KERNELS = {"cspn": [3, 5, 7], "dyspn": [5, 7]}
ITERATIONS = [2, 4, 6]
AFFINITY_NETS = ["light", "unet"]
CONFIGURATIONS = sum(len(kernels) for kernels in KERNELS.values()) * len(ITERATIONS) * len(AFFINITY_NETS)  # 30


def space(trial: optuna.Trial) -> None:
    kind = trial.suggest_categorical("refiner.kind", ["cspn", "dyspn"])
    trial.suggest_categorical(f"{kind}.kernel_size", KERNELS[kind])
    trial.suggest_categorical(f"{kind}.iterations", ITERATIONS)
    trial.suggest_categorical(f"{kind}.affinity_net", AFFINITY_NETS)


def score(config: dict[str, Any], rng: random.Random) -> float:
    """A plausible refined mIoU: larger kernels, more steps, DySPN and the U-Net affinity net a little better."""
    kind = config["refiner.kind"]
    return (0.6 + 0.02 * config[f"{kind}.kernel_size"] / 7 + 0.01 * config[f"{kind}.iterations"] / 6
            + 0.02 * (kind == "dyspn") + 0.01 * (config[f"{kind}.affinity_net"] == "unet") + rng.gauss(0, 0.005))  # fmt: skip


def search(trials: int, seed: int, distinct: bool) -> list[dict[str, Any]]:
    """The configurations ``trials`` trials run, one at a time (FINISHED ends it early)."""
    searcher: Searcher = OptunaSearch(space=space, metric="refined_miou", mode="max", sampler=tpe_sampler(seed, trials))
    if distinct:
        searcher = DistinctSearcher(searcher)
    rng = random.Random(seed)
    ran = []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        ran.append(config)
        searcher.on_trial_complete(f"t{i}", {"refined_miou": score(config, rng), "training_iteration": 1})
    return ran


def distinct(ran: list[dict[str, Any]]) -> int:
    return len({config_key(c) for c in ran})


def measure(trials: int = 24, seeds: int = 5) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    per_seed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multivariate/group TPE
        for seed in range(seeds):
            alone, behind = search(trials, seed, False), search(trials, seed, True)
            n_alone, n_behind = distinct(alone), distinct(behind)
            per_seed.append({"seed": seed, "repeats_tpe": len(alone) - n_alone, "repeats_distinct": len(behind) - n_behind,
                             "distinct_tpe": n_alone, "distinct_distinct": n_behind,
                             "trials_run_distinct": len(behind)})  # fmt: skip
    total = trials * seeds
    return {
        "configurations": CONFIGURATIONS, "trials": trials, "seeds": seeds, "per_seed": per_seed,
        "repeat_share_tpe": sum(s["repeats_tpe"] for s in per_seed) / total,
        "repeat_share_distinct": sum(s["repeats_distinct"] for s in per_seed) / total,
        "distinct_tpe": sum(s["distinct_tpe"] for s in per_seed) / seeds,
        "distinct_distinct": sum(s["distinct_distinct"] for s in per_seed) / seeds,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    r = measure(args.trials, args.seeds)
    for s in r["per_seed"]:
        print(f"seed {s['seed']}: TPE alone {s['repeats_tpe']} of {args.trials} trials repeat a configuration "
              f"({s['distinct_tpe']} distinct); behind DistinctSearcher {s['repeats_distinct']} "
              f"({s['distinct_distinct']} distinct)")  # fmt: skip
    print(f"{r['configurations']} configurations, {args.trials} trials: share of trials repeating a configuration "
          f"{r['repeat_share_tpe']:.2f} with TPE alone, {r['repeat_share_distinct']:.2f} behind DistinctSearcher; "
          f"distinct configurations {r['distinct_tpe']:.1f} vs {r['distinct_distinct']:.1f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
