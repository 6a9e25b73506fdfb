"""What ``spntune search --resume`` keeps: the settings a search started with (``search_options.resumed``).

No Ray here: a search's folder with its settings file is enough for every refusal, and the options a resume
hands to ``run_search`` are caught at that seam. ``test_search.py`` grows real searches with ``--trials``.
"""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import spntune.tune
from spntune.cli import main
from spntune.config import ConfigError
from spntune.search_options import SETTINGS_FILE, SearchOptions, read_settings, resumed, write_settings
from spntune.space import builtin_space_path, load_space

SPACE = """\
name: mine
base:
  data.name: synthetic
params:
  optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
"""


class Handed(Exception):
    """Raised by the stand-in for run_search: the options a command would have searched with."""

    def __init__(self, opts: SearchOptions) -> None:
        super().__init__("run_search called")
        self.opts = opts


@pytest.fixture
def started(tmp_path: Path) -> SearchOptions:
    """A search named 'grow' in tmp_path/ray, started with settings that are none of the defaults."""
    space_file = tmp_path / "mine.yaml"
    space_file.write_text(SPACE)
    opts = SearchOptions(space=load_space(space_file), space_file=space_file, trials=4, concurrency=3,
                         scheduler="none", grace_period=2, reduction_factor=3.0, objectives=["miou"], max_failures=2,
                         overrides={"train.epochs": 1, "data.image_size": (32, 64)}, seed=5,
                         tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e1", viz=False, name="grow",
                         storage=tmp_path / "ray")  # fmt: skip
    write_settings(opts)
    (opts.experiment_path / "tuner.pkl").write_bytes(pickle.dumps({}))  # Ray's state: a whole pickle
    return opts


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> None:
    def stand_in(opts: SearchOptions, listener: object = None) -> None:
        raise Handed(opts)

    monkeypatch.setattr(spntune.tune, "run_search", stand_in)


def _resume(started: SearchOptions, *flags: str) -> list[str]:
    return ["search", "--name", "grow", "--storage", str(started.storage), "--resume", *flags]


KEPT = ("space", "concurrency", "gpus_per_trial", "cpus_per_trial", "scheduler", "grace_period", "reduction_factor",
        "metric", "objectives", "max_failures", "overrides", "seed", "tracking_uri", "experiment", "viz", "trials")  # fmt: skip


def _kept(opts: SearchOptions) -> dict:
    values = {key: getattr(opts, key) for key in KEPT}
    values["space"] = opts.space.name
    values["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.overrides.items()}
    return values


def test_a_bare_resume_takes_every_setting_the_search_started_with(started, handed, capsys):
    with pytest.raises(Handed) as caught:
        main(_resume(started))
    assert f"resuming {started.experiment_path} with the settings it started with (space mine; 4 trials)" in (
        capsys.readouterr().out.replace("\n", "")
    )
    opts = caught.value.opts
    assert _kept(opts) == _kept(started)
    assert opts.space_file == started.space_file.resolve()
    assert opts.resume and opts.name == "grow"


def test_repeating_the_first_command_with_resume_is_accepted(started, handed, tmp_path):
    first = ["--space", str(started.space_file), "--trials", "4", "--concurrency", "3", "--scheduler", "none",
             "--grace-period", "2", "--reduction-factor", "3", "--max-failures", "2", "--set", "train.epochs=1",
             "--set", "data.image_size=[32, 64]", "--seed", "5", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
             "--experiment", "e1", "--no-viz", "--objective", "miou"]  # fmt: skip
    with pytest.raises(Handed) as caught:
        main(_resume(started, *first))
    assert _kept(caught.value.opts) == _kept(started)


def test_a_larger_trials_grows_the_search(started, handed, capsys):
    with pytest.raises(Handed) as caught:
        main(_resume(started, "--trials", "9"))
    assert "(space mine; 4 -> 9 trials)" in capsys.readouterr().out
    assert caught.value.opts.trials == 9
    assert caught.value.opts.concurrency == 3  # the rest stays the search's
    assert read_settings(started.experiment_path)["trials"] == 4  # run_search records it, once it runs


@pytest.mark.parametrize(
    "flags, message",
    [(["--trials", "3"], "--trials 3: the search has 4; a resume can add trials, not drop them"),
     (["--concurrency", "4"], "--concurrency 4 where the search has 3"),
     (["--cpus-per-trial", "2"], "--cpus-per-trial 2.0 where the search has 1.0"),
     (["--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5 where the search has 0.0"),
     (["--scheduler", "asha"], "--scheduler asha where the search has none"),
     (["--grace-period", "1"], "--grace-period 1 where the search has 2"),
     (["--reduction-factor", "2"], "--reduction-factor 2.0 where the search has 3.0"),
     (["--metric", "coarse_miou"], "--metric coarse_miou where the search has (default)"),
     (["--objective", "miou,latency"], "--objective miou,latency where the search has miou"),
     (["--max-failures", "0"], "--max-failures 0 where the search has 2"),
     (["--seed", "1"], "--seed 1 where the search has 5"),
     (["--experiment", "other"], "--experiment other where the search has e1"),
     (["--no-mlflow"], "--no-mlflow, where the search tracks MLflow at sqlite:///"),
     (["--space", "smoke"], "--space smoke is not the space this search ran"),
     (["--set", "train.epochs=2", "--set", "data.image_size=[32, 64]"],
      "--set (and --smoke-test): train.epochs=2 where the search has train.epochs=1"),
     (["--set", "train.epochs=1"], "without data.image_size, which the search sets"),
     (["--smoke-test"], "model.encoder=resnet18, which the search does not set"),
     (["--concurrency", "4", "--seed", "1"], "--concurrency 4 where the search has 3; --seed 1 where the search has 5")],
)  # fmt: skip
def test_a_flag_that_differs_from_the_search_is_refused(started, handed, capsys, flags, message):
    before = {p: p.read_bytes() for p in started.storage.rglob("*") if p.is_file()}
    assert main(_resume(started, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert f"--resume continues the search at {started.experiment_path}" in err
    assert {p: p.read_bytes() for p in started.storage.rglob("*") if p.is_file()} == before  # nothing written


def test_a_space_file_changed_or_gone_since_the_start_is_refused(started, handed, capsys):
    started.space_file.write_text(SPACE.replace("1.0e-2", "1.0e-1"))
    assert main(_resume(started)) == 2
    assert f"the space file {started.space_file.resolve()} changed since the search" in capsys.readouterr().err
    assert main(_resume(started, "--space", str(started.space_file))) == 2
    assert "is not the space this search ran" in capsys.readouterr().err
    started.space_file.unlink()
    assert main(_resume(started)) == 2
    assert "which is gone; pass --space with that space's file" in capsys.readouterr().err


def test_the_same_space_from_another_path_is_accepted(started, handed, tmp_path):
    copy = tmp_path / "copy.yaml"
    copy.write_text(started.space_file.read_text())
    with pytest.raises(Handed) as caught:
        main(_resume(started, "--space", str(copy)))
    assert caught.value.opts.space_file == copy


def test_a_built_in_space_is_recorded_by_name(tmp_path):
    opts = SearchOptions(space=load_space("smoke"), space_file=builtin_space_path("smoke"), name="b", storage=tmp_path)
    write_settings(opts)
    assert read_settings(opts.experiment_path)["space"] == "smoke"
    again = resumed(SearchOptions(space=load_space("pets"), name="b", storage=tmp_path, resume=True), given=())
    assert again.space.name == opts.space.name and again.space_file == builtin_space_path("smoke")


def test_a_search_without_settings_resumes_as_before(tmp_path):
    (tmp_path / "old").mkdir()  # a search started before settings were recorded
    opts = SearchOptions(space=load_space("smoke"), name="old", storage=tmp_path, resume=True, concurrency=7)
    assert resumed(opts, given={"concurrency"}) is opts


def test_an_unreadable_settings_file_is_refused_naming_it(started, capsys):
    path = started.experiment_path / SETTINGS_FILE
    path.write_text("{not json")
    assert main(_resume(started)) == 2
    assert f"cannot read the search's settings {path}" in capsys.readouterr().err
    path.write_text('{"trials": 3}')
    with pytest.raises(ConfigError, match="is not a search's settings file"):
        read_settings(started.experiment_path)


def test_run_search_checks_programmatic_options_against_the_settings(started):
    """run_search's own check (check_search) holds options built in code to the settings too."""
    from spntune.search_options import check_search

    with pytest.raises(ConfigError, match="--seed 0 where the search has 5"):
        check_search(SearchOptions(**{**{k: getattr(started, k) for k in KEPT}, "seed": 0, "space_file":
                                      started.space_file, "name": "grow", "storage": started.storage, "resume": True}))  # fmt: skip


def test_a_refused_resume_imports_nothing_heavy(started):
    code = (
        "import sys\n"
        "from spntune.cli import main\n"
        f"rc = main(['search', '--name', 'grow', '--storage', {str(started.storage)!r}, '--resume', '--seed', '1'])\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'segmentation_models_pytorch') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "--seed 1 where the search has 5" in out.stderr


def test_a_space_given_in_code_without_a_file_resumes_by_its_name(tmp_path, handed):
    opts = SearchOptions(space=load_space("smoke"), name="code", storage=tmp_path)  # no space_file: no sha recorded
    write_settings(opts)
    (opts.experiment_path / "tuner.pkl").write_bytes(pickle.dumps({}))
    assert read_settings(opts.experiment_path)["space_sha256"] is None
    for flags in ([], ["--space", "smoke"]):
        with pytest.raises(Handed) as caught:
            main(["search", "--name", "code", "--storage", str(tmp_path), "--resume", *flags])
        assert caught.value.opts.space.name == "smoke"


def test_growing_records_only_the_budget(started, tmp_path):
    """A resume that names a copy of the space keeps the original's path in the settings."""
    from spntune.search_options import grow_settings

    before = read_settings(started.experiment_path)
    grow_settings(started.experiment_path, 9)
    assert read_settings(started.experiment_path) == {**before, "trials": 9}


def test_a_failed_write_keeps_the_old_settings_and_leaves_no_temporary_file(started, monkeypatch):
    from spntune.search_options import grow_settings

    before = read_settings(started.experiment_path)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("spntune.search_options.os.replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        grow_settings(started.experiment_path, 9)
    assert read_settings(started.experiment_path) == before
    assert sorted(p.name for p in started.experiment_path.iterdir() if SETTINGS_FILE in p.name) == [SETTINGS_FILE]


def test_growth_that_cannot_take_effect_is_refused_and_not_recorded(started):
    """Where the restored search algorithm is not a GrowableSearch (a search from before it, Ray Client), a
    larger --trials would be ignored by Ray: refused, and the settings keep their budget."""
    from dataclasses import replace

    from spntune.tune import _record_settings

    grown = replace(started, resume=True, trials=9)
    with pytest.raises(ConfigError, match="--trials 9: the search at .* cannot add trials here"):
        _record_settings(grown, object())
    assert read_settings(started.experiment_path)["trials"] == 4
    _record_settings(replace(started, resume=True), object())  # the same budget: nothing to take effect


@pytest.mark.parametrize("content", ["null", "5", "[1, 2]", '{"trials": "many"}'])
def test_settings_that_are_not_an_object_of_settings_are_refused(started, content):
    (started.experiment_path / SETTINGS_FILE).write_text(content)
    with pytest.raises(ConfigError, match="is not a search's settings file"):
        read_settings(started.experiment_path)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("concurrency", "abc", "concurrency is \"abc\", expected an integer >= 1"),
    ("space", 5, "space is 5, expected a space's name or file"),
    ("overrides", "x", "overrides is \"x\", expected an object of config keys"),
    ("objectives", 5, "objectives is 5, expected a list of miou, latency"),
    ("tracking_uri", 5, "tracking_uri is 5, expected null or an MLflow URI"),
    ("seed", "x", "seed is \"x\", expected an integer"),
    ("scheduler", "bogus", "scheduler is \"bogus\", expected \"asha\" or \"none\""),
    ("experiment", None, "experiment is null, expected an MLflow experiment's name"),
    ("viz", "no", "viz is \"no\", expected true or false"),
    ("trials", -5, "trials is -5, expected an integer >= 1"),
    ("grace_period", True, "grace_period is true, expected an integer >= 1"),
])  # fmt: skip
def test_settings_changed_by_hand_are_refused_naming_the_file_and_the_value(started, capsys, key, value, expected):
    """Each value of the settings file is checked as it is read: a bad one is named with the file, before
    Ray starts (a traceback, or a value taken silently, before)."""
    path = started.experiment_path / SETTINGS_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    assert main(_resume(started)) == 2
    err = capsys.readouterr().err
    assert f"the search's settings {path} were changed by hand: {expected}." in err and "Traceback" not in err


def test_pictures_asked_where_the_search_has_none_are_named_that_way(started):
    from dataclasses import replace

    from spntune.search_options import check_search

    with pytest.raises(ConfigError, match="mask pictures, where the search has --no-viz"):
        check_search(replace(started, resume=True, viz=True))


def test_retry_errored_needs_resume_and_reaches_the_search(started, handed, capsys):
    args = ["search", "--name", "other", "--storage", str(started.storage), "--retry-errored"]
    assert main(args) == 2
    assert "--retry-errored continues the errored trials of a search: use it with --resume" in capsys.readouterr().err
    with pytest.raises(Handed) as caught:
        main(_resume(started, "--retry-errored"))
    assert caught.value.opts.retry_errored


def test_a_folder_without_ray_state_is_refused_on_resume(started, capsys):
    (started.experiment_path / "tuner.pkl").unlink()
    assert main(_resume(started)) == 2
    err = capsys.readouterr().err
    assert f"nothing to resume at {started.experiment_path}: it holds no search state (Ray's tuner.pkl)" in err
