"""The coarse cache: two-stage trials that share their coarse phase train it once (coarse_cache.py)."""

import multiprocessing
import os
import warnings

import pytest
import torch
from fixtures import make_folder

import spntune.trainables as trainables
from spntune.coarse_cache import CACHED_MARK, CoarseCache, CoarseEntry, coarse_key, coarse_key_fields, data_fingerprint
from spntune.config import TrialConfig
from spntune.data import build_datasets
from spntune.reporting import Reporter
from spntune.trainables import HISTORY_FILE, read_history, train_segmentation

TWO_STAGE = {  # the smallest two-stage trial: one batch of 32x32 images per epoch
    "data.image_size": [32, 32],
    "data.train_size": 4,
    "data.val_size": 2,
    "train.batch_size": 4,
    "train.stage": "two_stage",
    "train.coarse_epochs": 2,
    "train.refine_epochs": 1,
    "refiner.channels": 4,
    "refiner.iterations": 2,
    "train.viz_samples": 0,
}


class Collect(Reporter):
    def __init__(self):
        self.rows = []

    def report(self, epoch):
        self.rows.append(epoch.metrics)


def count_coarse_epochs(monkeypatch) -> list[int]:
    """Counts the coarse epochs this process trains (not replays)."""
    trained: list[int] = []
    original = trainables._train_epoch

    def counting(run, phase, optimiser, scheduler, epoch, reporter):
        if phase.name == "coarse":
            trained.append(epoch + 1)
        return original(run, phase, optimiser, scheduler, epoch, reporter)

    monkeypatch.setattr(trainables, "_train_epoch", counting)
    return trained


def key(config: dict, fingerprint: str = "data") -> str:
    return coarse_key(TrialConfig.from_dict({**TWO_STAGE, **config}), fingerprint, "cpu")


def test_key_ignores_the_refiner_and_follows_everything_the_coarse_phase_depends_on():
    same = [{"refiner.kind": "dyspn", "refiner.kernel_size": 7}, {"refiner.iterations": 6},
            {"refiner.affinity_net": "unet"}, {"refiner.channels": 64}, {"train.refine_epochs": 9},
            {"train.viz_samples": 3}, {"tracking.run_name": "x"}, {"output_dir": "/elsewhere"},
            {"train.coarse_cache_dir": "/other/cache"}, {"train.final_eval": False}]  # fmt: skip
    for change in same:
        assert key(change) == key({}), change
    differs = [{"optim.lr": 3e-4}, {"model.encoder": "resnet34"}, {"train.seed": 1}, {"data.limit_train": 2},
               {"data.image_size": [64, 64]}, {"data.augment": False}, {"train.coarse_epochs": 3},
               {"train.batch_size": 2}, {"train.loss": "ce+dice"}, {"model.arch": "fpn"}]  # fmt: skip
    keys = {key(change) for change in differs}
    assert len(keys) == len(differs) and key({}) not in keys
    assert key({}, fingerprint="other files") != key({})
    cfg = TrialConfig.from_dict(TWO_STAGE)
    assert coarse_key(cfg, "data", "cuda") != coarse_key(cfg, "data", "cpu")
    assert key({}) == key({}) and len(key({})) == 64  # stable, sha256
    # the memory format the trial uses, not the setting: "auto" is channels-last on the CPU
    assert key({"train.channels_last": True}) == key({}) != key({"train.channels_last": False})


def test_key_follows_the_precision_the_trial_computes_in(monkeypatch):
    """train.cpu_bf16 changes a CPU trial's coarse phase only where the CPU has native bf16 (elsewhere the
    trial runs float32 anyway); train.amp only on CUDA."""
    from spntune import coarse_cache

    monkeypatch.setattr(coarse_cache, "cpu_bf16_native", lambda: True)
    assert key({"train.cpu_bf16": True}) != key({}) == key({"train.amp": False})
    monkeypatch.setattr(coarse_cache, "cpu_bf16_native", lambda: False)
    assert key({"train.cpu_bf16": True}) == key({})


def test_data_fingerprint_follows_the_files(tmp_path):
    root = make_folder(tmp_path / "data")
    cfg = TrialConfig.from_dict({"data.name": "folder", "data.root": str(root)}).data

    def fingerprint(limit=None):
        train, val, _ = build_datasets(cfg.model_copy(update={"limit_train": limit}))
        return data_fingerprint(train, val)

    before = fingerprint()
    assert fingerprint() == before  # stable
    assert fingerprint(limit=1) != before  # another subset
    mask = root / "masks" / "train" / "img0.png"
    os.utime(mask, (mask.stat().st_atime, mask.stat().st_mtime + 10))  # the file was replaced
    assert fingerprint() != before


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two-stage trial without the cache, then twice with it (a miss, then a hit)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    try:
        trained = count_coarse_epochs(mp)
        plain, miss, hit = Collect(), Collect(), Collect()
        train_segmentation({**TWO_STAGE, "train.coarse_cache": False, "train.coarse_cache_dir": str(cache)}, plain)
        assert trained == [1, 2] and not list(cache.iterdir())  # coarse_cache: false never touches it
        train_segmentation({**TWO_STAGE, "train.coarse_cache_dir": str(cache)}, miss)
        assert trained == [1, 2, 1, 2]
        hit_dir = tmp_path_factory.mktemp("hit")
        train_segmentation({**TWO_STAGE, "train.coarse_cache_dir": str(cache), "output_dir": str(hit_dir)}, hit)
        assert trained == [1, 2, 1, 2]  # the hit trained no coarse epoch
    finally:
        mp.undo()
    return {"plain": plain.rows, "miss": miss.rows, "hit": hit.rows, "cache": cache, "hit_dir": hit_dir}


def test_a_hit_gives_the_results_of_a_run_without_the_cache(runs):
    plain, miss, hit = runs["plain"], runs["miss"], runs["hit"]
    assert [r["epoch"] for r in hit] == [1, 2, 3] and [r["phase"] for r in hit] == ["coarse", "coarse", "refine"]
    assert [r.get(CACHED_MARK, 0) for r in hit] == [1, 1, 0] and not any(CACHED_MARK in r for r in miss)
    for a, b, c in zip(plain, miss, hit, strict=True):  # every epoch the reporters hear
        assert a["coarse_miou"] == b["coarse_miou"] == c["coarse_miou"]
        assert a["train_loss"] == b["train_loss"] == c["train_loss"]
        assert a["refined_miou"] == pytest.approx(c["refined_miou"], abs=1e-9)  # identity refiner: = coarse
        assert {k for k in a if k.startswith("refined_miou_t")} == {k for k in c if k.startswith("refined_miou_t")}
    final = {k: v for k, v in plain[-1].items() if k.startswith("final_") or k.startswith("refined_")}
    assert final and {k: hit[-1][k] for k in final} == final  # the refine phase: identical
    history = read_history((runs["hit_dir"] / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # the history holds the replayed epochs once


def test_entries_are_named_by_key_and_load_safely(runs):
    cache = CoarseCache(runs["cache"])
    (entry_file,) = runs["cache"].glob("*.pt")
    entry = cache.load(entry_file.stem)
    assert entry is not None and len(entry.rows) == 2 and entry.fields["train"]["coarse_epochs"] == 2
    assert not list(runs["cache"].glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncated", "other weights"])
def test_a_corrupt_entry_is_retrained(runs, tmp_path, monkeypatch, damage):
    (stored,) = runs["cache"].glob("*.pt")
    entry_file = tmp_path / stored.name
    if damage == "truncated":
        entry_file.write_bytes(stored.read_bytes()[:1000])
    else:  # readable, but weights of another network (another version of its code)
        CoarseCache(tmp_path).store(
            stored.stem, CoarseEntry(rows=[{}, {}], coarse_state={"w": torch.ones(1)}, best_epoch=1)
        )
    trained = count_coarse_epochs(monkeypatch)
    again = Collect()
    reason = "unreadable" if damage == "truncated" else "not weights of this coarse network"
    with pytest.warns(RuntimeWarning, match=f"{reason}.*training the coarse network again"):
        train_segmentation({**TWO_STAGE, "train.coarse_cache_dir": str(tmp_path)}, again)
    assert trained == [1, 2]
    assert [r["refined_miou"] for r in again.rows] == [r["refined_miou"] for r in runs["plain"]]
    assert CoarseCache(tmp_path).load(entry_file.stem) is not None  # stored again, whole


def _entry() -> CoarseEntry:
    return CoarseEntry(rows=[{"epoch": 1, "coarse_miou": 0.5}], coarse_state={"w": torch.ones(3)}, best_epoch=1)


def test_a_half_written_entry_is_never_read(tmp_path, monkeypatch):
    cache = CoarseCache(tmp_path)
    (tmp_path / ".k.abc.tmp").write_bytes(b"PK\x03\x04 half of a zip")  # a writer killed mid-write
    assert cache.load("k") is None

    def dies_mid_write(obj, fh):
        fh.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cache.store("k", _entry())
    assert not cache.entry_path("k").exists() and [p.name for p in tmp_path.iterdir()] == [".k.abc.tmp"]
    monkeypatch.undo()
    cache.store("k", _entry())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.load("k").coarse_state["w"], torch.ones(3))


def _train_in_child(config: dict, counter: str, barrier) -> None:
    """A trial in its own process; appends a line to ``counter`` per coarse epoch it trains."""
    original = trainables._train_epoch

    def counting(run, phase, *args):
        if phase.name == "coarse":
            with open(counter, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        return original(run, phase, *args)

    trainables._train_epoch = counting
    barrier.wait()  # both ask for the coarse network at the same moment
    train_segmentation(config)


def test_concurrent_trials_in_two_processes_train_the_coarse_network_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    counter = tmp_path / "coarse_epochs.txt"
    base = {**TWO_STAGE, "train.coarse_cache_dir": str(tmp_path / "cache"), "train.final_eval": False}
    configs = [{**base, "refiner.kind": "cspn"}, {**base, "refiner.kind": "dyspn", "refiner.kernel_size": 5}]
    children = [ctx.Process(target=_train_in_child, args=(c, str(counter), barrier)) for c in configs]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=240)
    assert [c.exitcode for c in children] == [0, 0]
    trained = counter.read_text().split()
    assert len(trained) == 2 and len(set(trained)) == 1  # 2 coarse epochs, by one of the two processes
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_resume_mid_replay_and_mid_refine(runs, tmp_path, monkeypatch):
    """A crash while replaying cached epochs resumes from the checkpoint alone; one in the refine phase
    never touches the cache. Both end where an uninterrupted trial ends."""
    config = {**TWO_STAGE, "train.coarse_cache_dir": str(runs["cache"]), "train.final_eval": False}
    for crash_epoch, point in ((2, "start"), (3, "start")):
        out = tmp_path / f"run{crash_epoch}"
        monkeypatch.setenv("SPNTUNE_CRASH_ONCE", f"{tmp_path / f'crashed{crash_epoch}'}:{crash_epoch}:{point}")
        before, after = Collect(), Collect()
        with pytest.raises(RuntimeError, match="injected crash"):
            train_segmentation({**config, "output_dir": str(out)}, before)
        assert [r[CACHED_MARK] for r in before.rows] == [1] * (crash_epoch - 1)
        moved = {**config, "output_dir": str(out), "train.coarse_cache_dir": str(tmp_path / "empty")}
        train_segmentation(moved, after, resume_from=out)
        assert not (tmp_path / "empty").exists()  # the resumed trial did not use the cache
        assert [r["epoch"] for r in before.rows + after.rows] == [1, 2, 3]
        assert after.rows[-1]["refined_miou"] == runs["plain"][-1]["refined_miou"]
        assert [h["epoch"] for h in read_history((out / HISTORY_FILE).read_text())] == [1, 2, 3]


def test_spntune_train_keeps_no_cache_by_default():
    cfg = TrialConfig.from_dict(TWO_STAGE)
    assert cfg.train.coarse_cache and cfg.train.coarse_cache_dir is None
    assert "coarse_cache" not in coarse_key_fields(cfg, "data", "cpu")["train"]
