"""Real Ray Tune + Optuna searches on this machine (tiny trials on synthetic or fixture data)."""

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from fixtures import PROCESS_MARKER, end_processes, free_port, make_folder

from spntune.cli import main
from spntune.search_options import read_settings

SPNTUNE = [sys.executable, "-m", "spntune.cli"]
RAY = str(Path(sys.executable).parent / "ray")
TINY = [
    "--set",
    "data.train_size=8",
    "--set",
    "data.val_size=4",
    "--set",
    "data.limit_train=8",
    "--set",
    "data.limit_val=4",
]


def leaderboard(experiment: Path) -> list[dict]:
    with (experiment / "leaderboard.csv").open() as fh:
        return list(csv.DictReader(fh))


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("spntune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_smoke_search_two_trials(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # no database yet: the search creates it (other tests copy an empty one)
    args = ["search", "--smoke-test", "--storage", str(tmp_path), "--name", "smoke", "--scheduler", "none",
            "--tracking-uri", uri, "--set", "train.viz_samples=1", *TINY]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out and "2 trials" in out
    rows = leaderboard(tmp_path / "smoke")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    # the seed configuration from smoke.yaml ran first: U-Net + CSPN 3x3, T = 6
    assert any("unet/resnet18 + cspn k3 T6" in r["pipeline"] for r in rows)
    for r in rows:
        assert 0.0 <= float(r["best_refined_miou"]) <= 1.0
        assert any(p.name.startswith("checkpoint_") for p in Path(r["path"]).iterdir())

    # MLflow: one parent run, one finished child run per trial with per-epoch metrics and artifacts
    client, parents, children = mlflow_runs(uri)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["spntune.search"] == "smoke"
    assert parent.data.tags["spntune.space_exhausted"] == "False" and "spntune.repeats_skipped" in parent.data.tags
    assert parent.data.tags["best_trial_run_id"] in {c.info.run_id for c in children}
    parent_files = {
        f.path for d in ("leaderboard", "plots", "search_space") for f in client.list_artifacts(parent.info.run_id, d)
    }
    assert {"leaderboard/leaderboard.csv", "leaderboard/leaderboard.html", "search_space/smoke.yaml"} <= parent_files
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["data.name"] == "synthetic"
        history = client.get_metric_history(child.info.run_id, "refined_miou")
        assert [m.step for m in history] == [1, 2]
        for key in (
            "coarse_miou",
            "refined_boundary_iou",
            "refined_pixel_acc",
            "refined_mean_dice",
            "refined_iou_curve",
            "epoch_seconds",
        ):
            assert key in child.data.metrics
        files = {
            f.path for d in ("panels", "gradcam", "checkpoint") for f in client.list_artifacts(child.info.run_id, d)
        }
        assert {
            "panels/panel_000.png",
            "panels/steps_000.png",
            "gradcam/gradcam_000.png",
            "checkpoint/checkpoint.pt",
        } <= files
        assert [f.path for f in client.list_artifacts(child.info.run_id) if f.path == "config.yaml"]

    # A damaged search folder is not resumed: Ray would start the search over (finished trials dropped from
    # leaderboard.csv), propose trials past the budget or rank a trial without its folder last
    experiment = tmp_path / "smoke"
    state = max(experiment.glob("experiment_state-*.json"))
    trial_dir = Path(rows[0]["path"]).name
    damages = {
        "truncated_state": (lambda d: (d / state.name).write_text(state.read_text()[:200]), state.name),
        "no_searcher": (lambda d: [p.unlink() for p in d.glob("searcher-state-*.pkl")], "searcher-state-*.pkl is missing"),
        "no_trial": (lambda d: shutil.rmtree(d / trial_dir), "are gone"),
        "truncated_tuner": (lambda d: (d / "tuner.pkl").write_bytes((experiment / "tuner.pkl").read_bytes()[:100]),
                            "tuner.pkl cannot be read"),
    }  # fmt: skip
    for kind, (damage, message) in damages.items():
        copy = tmp_path / kind / "smoke"
        shutil.copytree(experiment, copy)
        damage(copy)
        assert main(["search", "--storage", str(copy.parent), "--name", "smoke", "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"cannot resume the search at {copy}" in err and message in err, err
        assert (copy / "leaderboard.csv").read_text() == (experiment / "leaderboard.csv").read_text()
    # damage only Ray can see (a trial's runtime state): Ray fails to restore, the resume stops before a trial
    # runs, and the parent run gets back the status it had
    copy = tmp_path / "bad_runtime" / "smoke"
    shutil.copytree(experiment, copy)
    saved = json.loads(state.read_text())
    saved["trial_data"][0][1] = "{not json"
    (copy / state.name).write_text(json.dumps(saved))
    assert main(["search", "--storage", str(copy.parent), "--name", "smoke", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume the search at {copy}: Ray could not restore its state" in err, err
    assert (copy / "leaderboard.csv").read_text() == (experiment / "leaderboard.csv").read_text()
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize(("statuses", "line"), [
    (["completed", "completed"], "2 trials in 3 s: 2 completed, 0 errored"),
    (["completed", "stopped", "error"], "3 trials in 3 s: 1 completed, 1 stopped early (ASHA), 1 errored"),
])  # fmt: skip
def test_the_summary_counts_trials_stopped_early_only_where_there_are_some(tmp_path, statuses, line):
    """A search without ASHA (--scheduler none) stops nothing early: its summary does not say "0 stopped early
    (ASHA)"."""
    from rich.console import Console

    from spntune.console import print_search_summary
    from spntune.leaderboard import SearchSummary, TrialRow
    from spntune.status import TrialStatus

    rows = [TrialRow(f"t{i}", TrialStatus(s), "unet", 1, 0.5, {}) for i, s in enumerate(statuses)]
    console = Console(record=True, width=200)
    print_search_summary(SearchSummary(rows, tmp_path, "refined_miou", 3.0), top=5, console=console)
    assert line in console.export_text()


@pytest.mark.slow  # a real search, 17-22 s: keeps the default suite near 10 min (test_distinct.py covers the wrapper)
def test_a_configuration_that_ran_is_not_trained_again(tmp_path, capsys):
    """A space of two configurations, two trials at once and four asked for: TPE proposes the two again and
    again; while both run the repeats wait for their results, each trains once (two trials), and the search
    ends when nothing new is proposed."""
    space = tmp_path / "two.yaml"
    space.write_text(yaml.safe_dump({
        "name": "two", "metric": "refined_miou", "mode": "max",
        "base": {"data.name": "synthetic", "data.image_size": [32, 32], "model.encoder": "resnet18",
                 "model.encoder_weights": None, "train.epochs": 1, "train.batch_size": 4},
        "params": {"refiner.kind": {"choice": ["none", "cspn"]}},
    }))  # fmt: skip
    args = ["search", "--space", str(space), "--trials", "4", "--concurrency", "2", "--storage", str(tmp_path),
            "--name", "two", "--scheduler", "none", "--tracking-uri", "none", *TINY]  # fmt: skip
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    rows = leaderboard(tmp_path / "two")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert sorted(r["pipeline"].split(" + ")[1].split()[0].strip(",") for r in rows) == ["cspn", "none"]
    assert "proposed configurations had run already in this search: not trained again" in out
    assert "the search ended after 2 of 4 trials" in out


def _demo_args() -> list[str]:
    """The arguments `make demo` passes to spntune, read from the Makefile itself."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    line = next(ln for ln in recipe.splitlines() if "spntune search" in ln)
    words = shlex.split(line)
    return words[next(i for i, w in enumerate(words) if w.endswith("spntune")) + 1 :]


@pytest.mark.slow  # `make demo` as the Makefile runs it, 1.5 min: make test-slow (the smoke search test covers pictures)
def test_make_demo_logs_pictures_for_every_trial(tmp_path):
    """`make demo`'s own search, run where it writes ./runs and ./mlflow_runs: every trial's MLflow run
    holds mask panels, h^0..h^T strips and Grad-CAM pictures."""
    args = _demo_args()
    assert args[:3] == ["search", "--space", "smoke"] and "--smoke-test" not in args
    out = subprocess.run([*SPNTUNE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Token authentication" not in out.stdout + out.stderr  # no warning the user cannot act on
    assert "spntune ui" in out.stdout
    client, parents, children = mlflow_runs(f"sqlite:///{tmp_path}/mlflow_runs/mlflow.db")
    assert len(parents) == 1 and len(children) == int(args[args.index("--trials") + 1])
    for child in children:
        pictures = {
            f.path for d in ("panels", "gradcam") for f in client.list_artifacts(child.info.run_id, d)
            if f.path.endswith(".png")
        }  # fmt: skip
        assert {"panels/panel_000.png", "panels/steps_000.png", "gradcam/gradcam_000.png"} <= pictures, child.info
        assert child.data.tags["best_epoch"] in {"1", "2"}


def test_failing_trials_do_not_stop_the_search(tmp_path, capsys, mlflow_sqlite):
    """Three trials fail in three ways (a missing split, a loss that turns NaN, out of memory under
    ``train.memory_limit_gb``); each is errored with a readable reason and its MLflow run FAILED, and the
    fourth trial completes."""
    data = make_folder(tmp_path / "data")
    space = {
        "name": "err",
        "base": {"data.name": "folder", "data.root": str(data), "data.image_size": [128, 128], "train.epochs": 1,
                 "train.viz_samples": 0, "refiner.kind": "none", "optim.name": "sgd", "optim.lr": 0.01,
                 "optim.grad_clip": None, "train.memory_limit_gb": 0.5, "train.final_eval": False},
        "params": {"data.val_split": {"choice": ["val", "nosuchsplit"]},
                   "train.loss": {"choice": ["ce", "1e30*ce"]},  # weights blow up after one SGD step: NaN
                   "train.batch_size": {"choice": [1, 2, 64]}},  # 64 images of 128x128 need more than 0.5 GB
        "points_to_evaluate": [{"data.val_split": "nosuchsplit", "train.loss": "ce", "train.batch_size": 2},
                               {"data.val_split": "val", "train.loss": "1e30*ce", "train.batch_size": 1},
                               {"data.val_split": "val", "train.loss": "ce", "train.batch_size": 64},
                               {"data.val_split": "val", "train.loss": "ce", "train.batch_size": 2}],
    }  # fmt: skip
    path = tmp_path / "err.yaml"
    path.write_text(yaml.safe_dump(space))
    uri = mlflow_sqlite
    args = ["search", "--space", str(path), "--trials", "4", "--storage", str(tmp_path / "ray"), "--max-failures", "0",
            "--scheduler", "none", "--tracking-uri", uri]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 errored" in out and "split 'nosuchsplit' not found" in out
    assert "--resume --retry-errored continues them from their last checkpoint" in out.replace("\n", " ")
    rows = leaderboard(tmp_path / "ray" / "err")
    assert sorted(r["status"] for r in rows) == ["completed", "error", "error", "error"]
    expected = {"2": "nosuchsplit", "1": "training loss became nan at epoch 1, batch 2",
                "64": "out of memory (train.batch_size=64, data.image_size=[128, 128], train.memory_limit_gb=0.5)"}  # fmt: skip
    _, _, children = mlflow_runs(uri)
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED", "FAILED", "FINISHED"]  # never RUNNING
    for run in children:
        if run.info.status == "FAILED":
            batch, reason = run.data.params["train.batch_size"], run.data.tags["spntune.reason"]
            assert expected[batch] in reason, reason
            assert "Traceback" not in reason
            assert any(expected[batch] in r["error"] for r in rows)  # the leaderboard says the same


def test_asha_stopped_trial_run_is_killed(tmp_path, mlflow_sqlite):
    space = {
        "name": "asha",
        "base": {"data.image_size": [64, 64], "data.train_size": 16, "data.val_size": 8, "train.epochs": 3,
                 "train.batch_size": 8, "train.viz_samples": 0, "refiner.kind": "none"},
        "params": {"optim.lr": {"choice": [3.0e-3, 1.0e-9]}},
        # a sane trial first, then one that cannot learn: ASHA's rung at epoch 1 keeps the top half
        "points_to_evaluate": [{"optim.lr": 3.0e-3}, {"optim.lr": 1.0e-9}],
    }  # fmt: skip
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(space))
    uri = mlflow_sqlite
    args = ["search", "--space", str(path), "--trials", "2", "--concurrency", "1", "--storage", str(tmp_path / "ray"),
            "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2", "--tracking-uri", uri]  # fmt: skip
    assert main(args) == 0
    rows = leaderboard(tmp_path / "ray" / "asha")
    assert sorted(r["status"] for r in rows) == ["completed", "stopped"]
    _, parents, children = mlflow_runs(uri)
    assert parents[0].info.status == "FINISHED"
    by_status = {c.info.status: c for c in children}
    assert set(by_status) == {"FINISHED", "KILLED"}
    assert "stopped" in by_status["KILLED"].data.tags["spntune.reason"]


def test_existing_name_needs_resume_and_missing_needs_none(tmp_path, capsys):
    (tmp_path / "smoke").mkdir()
    assert main(["search", "--smoke-test", "--storage", str(tmp_path), "--name", "smoke", "--no-mlflow"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["search", "--smoke-test", "--storage", str(tmp_path), "--name", "other", "--resume", "--no-mlflow"]) == 2
    )
    assert "nothing to resume" in capsys.readouterr().err


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_resume_after_killing_the_driver(tmp_path, mlflow_sqlite):
    storage, name = tmp_path / "ray", "resume"
    uri = mlflow_sqlite
    args = ["search", "--smoke-test", "--trials", "3", "--concurrency", "1", "--scheduler", "none", "--tracking-uri", uri,
            "--storage", str(storage), "--name", name, "--set", "train.epochs=3", *TINY]  # fmt: skip
    tag = uuid.uuid4().hex  # marks the driver and every Ray process it starts
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PROCESS_MARKER: tag}
    proc = subprocess.Popen(
        [*SPNTUNE, *args], start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    experiment = storage / name
    deadline = time.time() + 240
    try:
        # kill once one trial has finished and the next one is part-way through
        while time.time() < deadline:
            trials = [d for d in experiment.glob("run_trial_*") if d.is_dir()] if experiment.is_dir() else []
            epochs = sorted(len(_results(d)) for d in trials)
            if epochs.count(3) >= 1 and any(0 < e < 3 for e in epochs):
                break
            time.sleep(0.5)
        else:
            pytest.fail("search did not reach the kill point in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes in its group
        proc.wait()
        end_processes(tag)  # and any Ray process that left the group; other Rays on this machine live on
    finished_before = {d.name: len(_results(d)) for d in experiment.glob("run_trial_*") if len(_results(d)) == 3}
    assert finished_before

    try:  # the same command with --resume, and one trial more (search_options.resumed, tune.GrowableSearch)
        resumed = subprocess.run([*SPNTUNE, *args, "--resume", "--trials", "4"], capture_output=True, text=True,
                                 env=env, timeout=900)  # fmt: skip
    finally:
        end_processes(tag)  # a Ray left behind by a resume that timed out
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # the live table follows the resumed search: a line per epoch of every trial that still had epochs to run
    followed = {line.split()[1] for line in resumed.stdout.splitlines() if re.match(r"trial \S+ epoch \d", line)}
    assert len(followed) >= 4 - len(finished_before), resumed.stdout
    rows = leaderboard(experiment)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    assert len({r["trial_id"] for r in rows}) == 4
    for trial, count in finished_before.items():
        assert len(_results(experiment / trial)) == count  # finished trials were not re-run
    trials = history(experiment)
    assert set(trials) == {r["trial_id"] for r in rows}
    for epochs in trials.values():  # every epoch exactly once, also for the trial killed part-way
        assert [int(h["epoch"]) for h in epochs] == [1, 2, 3]
    # MLflow: the same parent run, one child run per trial (a resumed trial continues its run)
    _, parents, children = mlflow_runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["spntune.ray_trial_id"] for c in children}) == 4
    # the resumed search found the repeat-skipping searcher Ray restored (its state came from the checkpoint)
    tags = parents[0].data.tags  # (the killed first run never got to set them)
    assert tags["spntune.space_exhausted"] == "False" and "spntune.repeats_skipped" in tags
    assert parents[0].data.params["trials"] == "3" and tags["spntune.trials"] == "4"
    assert read_settings(experiment)["trials"] == 4


@pytest.mark.slow  # two real searches, 45-50 s: make test-slow (the killed-driver test grows a search by one trial)
def test_a_finished_search_grows_with_more_trials(tmp_path, capsys):
    """``--resume --trials N`` on a finished search runs only the new trials: the finished one is not re-run
    and the new one is a configuration not run before (TPE and DistinctSearcher go on from what they saw)."""
    # ASHA (the default scheduler): its rungs must come back too
    args = ["search", "--smoke-test", "--trials", "1", "--no-mlflow", "--storage", str(tmp_path), "--name", "grow",
            *TINY]  # fmt: skip
    assert main(args) == 0
    experiment = tmp_path / "grow"
    first = {d.name: _results(d) for d in experiment.glob("run_trial_*")}
    assert len(first) == 1 and read_settings(experiment)["trials"] == 1
    capsys.readouterr()
    # a bare resume: every setting (--smoke-test's and --set's keys, --no-mlflow...) is the search's own
    assert main(["search", "--storage", str(tmp_path), "--name", "grow", "--resume", "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 trials" in out, out
    rows = leaderboard(experiment)
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped") for r in rows), rows
    for trial, results in first.items():
        assert _results(experiment / trial) == results  # not run again
    new = {r["trial_id"] for r in rows} - {trial.split("_")[2] for trial in first}
    assert len(new) == 1
    followed = {line.split()[1] for line in out.splitlines() if re.match(r"trial \S+ epoch \d", line)}
    assert followed == new, out
    assert len({r["pipeline"] for r in rows}) == 2  # a configuration not run before
    assert read_settings(experiment)["trials"] == 2
    assert not list(experiment.glob(".spntune_search.json.*"))  # the settings were replaced atomically
    # ASHA's rungs came back (tune.SchedulerState): the grown search's last checkpoint (Ray's callback-state
    # file) records, at the first milestone, the first trial (which never reported again) beside the new one
    import cloudpickle

    newest = sorted(experiment.glob("callback-states-*.pkl"))[-1]
    states = [s for s in cloudpickle.loads(newest.read_bytes()).values() if s and "scheduler" in s]
    rungs = {milestone: set(recorded) for milestone, recorded in states[0]["scheduler"]["_brackets"][0]._rungs}
    assert rungs[1.0] == {r["trial_id"] for r in rows}, rungs


@pytest.fixture
def two_node_cluster(tmp_path):
    """Head and worker on 127.0.0.1 with ports and a --temp-dir of their own; teardown ends exactly their
    processes, so other Rays on the machine (another suite, a user's) are never touched."""
    port = free_port()
    tag = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", PROCESS_MARKER: tag}
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths have a length limit
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        f"--temp-dir={temp_dir}", *common], check=True, capture_output=True, env=env)  # fmt: skip
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", f"--dashboard-agent-listen-port={free_port()}",
                        *common], check=True, capture_output=True, env=env)  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        end_processes(tag)  # this cluster's processes only (`ray stop` would end every Ray here)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # ~1.5 min on 2 cores: make test-slow
def test_search_on_a_two_node_cluster(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    args = ["search", "--smoke-test", "--trials", "2", "--concurrency", "2", "--cpus-per-trial", "1", "--scheduler", "none",
            "--address", address, "--storage", str(tmp_path), "--name", "cluster",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *TINY]  # fmt: skip
    out = subprocess.run([*SPNTUNE, *args], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    node_ids = set()
    for d in (tmp_path / "cluster").glob("run_trial_*"):
        node_ids |= {r["node_id"] for r in _results(d)}
    assert len(node_ids) == 2  # one trial on each node
    # a local search (no --address) on this machine starts a Ray of its own, not the cluster's
    local = [*SPNTUNE, *args[: args.index("--address")], *args[args.index("--storage") :]]
    local[local.index("cluster")] = "local"
    out = subprocess.run(local, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    local_nodes = {r["node_id"] for d in (tmp_path / "local").glob("run_trial_*") for r in _results(d)}
    assert local_nodes and not local_nodes & node_ids


@pytest.mark.slow  # a real search, 18-24 s: keeps the default suite near 10 min on 2 cores (make test-slow)
def test_multi_objective_reports_a_pareto_set(tmp_path):
    from spntune.config import SEARCH_SMOKE_OVERRIDES, ConfigError
    from spntune.space import load_space
    from spntune.tune import SearchOptions, run_search

    overrides = {**SEARCH_SMOKE_OVERRIDES, "data.train_size": 8, "data.limit_train": 8}
    opts = SearchOptions(space=load_space("smoke"), trials=3, scheduler="none", objectives=["miou", "latency"],
                         storage=tmp_path, name="mo", tracking_uri="none", overrides=overrides)  # fmt: skip
    summary = run_search(opts)
    assert summary.pareto

    def point(r):
        return (r.last["refined_miou"], -r.last["infer_ms_per_image"])

    done = [r for r in summary.rows if r.status != "error"]
    for p in summary.pareto:  # no finished trial is at least as good on both and better on one
        assert not any(all(a >= b for a, b in zip(point(o), point(p))) and point(o) != point(p) for o in done)
    for r in done:
        if r not in summary.pareto:
            assert any(all(a >= b for a, b in zip(point(p), point(r))) for p in summary.pareto)
    with pytest.raises(ConfigError, match="--objective takes miou, latency"):
        run_search(SearchOptions(space=load_space("smoke"), objectives=["accuracy"], storage=tmp_path, name="bad"))


def history(experiment: Path) -> dict[str, list[dict]]:
    """``history.csv``: each trial's epochs as the user reads them."""
    with (experiment / "history.csv").open() as fh:
        out: dict[str, list[dict]] = {}
        for row in csv.DictReader(fh):
            out.setdefault(row["trial_id"], []).append(row)
    return out


# "report" (a crash as the epoch is reported, ~1 min) runs in make test-slow; "start" keeps the retry path in make test
@pytest.mark.parametrize("point", ["start", pytest.param("report", marks=pytest.mark.slow)])
def test_crashed_trial_is_retried_from_its_last_checkpoint(tmp_path, point, capsys, mlflow_sqlite):
    import ray

    from spntune.config import SEARCH_SMOKE_OVERRIDES
    from spntune.space import SearchSpace
    from spntune.tune import SearchOptions, run_search

    marker = tmp_path / "crashed"
    # Ray workers get the variable from the runtime environment; run_search reuses this Ray instance and
    # leaves it running: a Ray the caller started is the caller's to shut down.
    # "start": the crash comes right after epoch 1's report (Ray may not have synced its result yet);
    # "report": epoch 2 is trained and evaluated, but neither MLflow nor Ray hears of it.
    node_tmp = tmp_path / "node-tmp"  # the workers' TMPDIR: where trials stage their checkpoints
    node_tmp.mkdir()
    ray.init(runtime_env={"env_vars": {"SPNTUNE_CRASH_ONCE": f"{marker}:2:{point}", "TMPDIR": str(node_tmp)}},
             include_dashboard=False)  # fmt: skip
    uri = mlflow_sqlite
    space = SearchSpace(
        name="retry", base={**SEARCH_SMOKE_OVERRIDES, "train.epochs": 3, "data.train_size": 8, "data.limit_train": 8}
    )
    try:
        summary = run_search(SearchOptions(space=space, trials=1, scheduler="none", max_failures=1,
                                           storage=tmp_path / "ray", name="retry", tracking_uri=uri))  # fmt: skip
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert marker.exists()  # it did crash, in epoch 2
    (row,) = summary.rows
    assert row.status == "completed" and row.epochs == 3
    # What the user reads: the leaderboard and history.csv hold every epoch exactly once
    (board,) = leaderboard(tmp_path / "ray" / "retry")
    assert board["status"] == "completed" and board["epochs"] == "3"
    epochs = history(tmp_path / "ray" / "retry")[row.trial_id]
    assert [int(h["epoch"]) for h in epochs] == [1, 2, 3]
    assert float(board["best_refined_miou"]) == max(float(h["refined_miou"]) for h in epochs)
    _, _, children = mlflow_runs(uri)
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # the retry continued the same run
    # spntune best reads MLflow: the trial ran 3 epochs (an epoch logged twice counts once)
    capsys.readouterr()
    assert main(["best", "--tracking-uri", uri, "--search", "retry"]) == 0
    best_row = next(line for line in capsys.readouterr().out.splitlines() if row.trial_id in line)
    assert "│ 3 " in best_row and "completed" in best_row
    # the crashed attempt and the retry left no staged checkpoints behind on the node
    assert list(node_tmp.glob("spntune-trial-*")) == []


@pytest.mark.slow  # two real searches in one Ray, ~40 s: make test-slow
def test_errored_trials_continue_from_their_checkpoint_with_retry_errored(tmp_path, mlflow_sqlite):
    import dataclasses

    import ray

    from spntune.config import SEARCH_SMOKE_OVERRIDES
    from spntune.space import SearchSpace
    from spntune.tune import SearchOptions, run_search

    marker = tmp_path / "crashed"  # one crash, at the start of epoch 2 (after epoch 1's checkpoint)
    ray.init(runtime_env={"env_vars": {"SPNTUNE_CRASH_ONCE": f"{marker}:2"}}, include_dashboard=False)
    space = SearchSpace(
        name="errored", base={**SEARCH_SMOKE_OVERRIDES, "train.epochs": 3, "data.train_size": 8, "data.limit_train": 8}
    )
    opts = SearchOptions(space=space, trials=1, scheduler="none", max_failures=0, storage=tmp_path / "ray",
                         name="errored", tracking_uri=mlflow_sqlite)  # fmt: skip
    experiment = tmp_path / "ray" / "errored"
    try:
        first = run_search(opts)  # no retries: the trial errors
        (row,) = first.rows
        assert row.status == "error" and "injected crash" in row.error, row
        epoch_1 = history(experiment)[row.trial_id]
        assert [int(h["epoch"]) for h in epoch_1] == [1]
        again = run_search(dataclasses.replace(opts, resume=True, retry_errored=True))
    finally:
        ray.shutdown()
    (row,) = again.rows
    assert row.status == "completed" and row.epochs == 3, row
    epochs = history(experiment)[row.trial_id]
    assert [int(h["epoch"]) for h in epochs] == [1, 2, 3]
    # epoch 1 (its wall-clock seconds included) came from the checkpoint (the final file has final_* columns more)
    assert {k: epochs[0][k] for k in epoch_1[0]} == epoch_1[0] and "train_seconds" in epoch_1[0]
    _, _, children = mlflow_runs(mlflow_sqlite)
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # the errored run, continued and closed


@pytest.mark.parametrize(
    "flag, value, message",
    [("--trials", "0", "--trials must be an integer >= 1, got 0"),
     ("--trials", "-2", "--trials must be an integer >= 1, got -2"),
     ("--concurrency", "0", "--concurrency must be an integer >= 1, got 0"),
     ("--gpus-per-trial", "-1", "--gpus-per-trial must be a number >= 0"),
     ("--gpus-per-trial", "64", "--gpus-per-trial 64: this machine has"),  # e.g. 1 where there is none
     ("--cpus-per-trial", "4096", "--cpus-per-trial 4096: this machine has"),
     ("--address", "127.0.0.1:1", "--address 127.0.0.1:1: no Ray head answers there"),
     ("--address", "nohost", "--address takes auto or HOST:PORT"),
     ("--cpus-per-trial", "0", "--cpus-per-trial must be a number > 0"),
     ("--grace-period", "0", "--grace-period must be an integer >= 1"),
     ("--reduction-factor", "1", "--reduction-factor must be a finite number > 1"),
     ("--reduction-factor", "inf", "--reduction-factor must be a finite number > 1, got inf"),
     ("--gpus-per-trial", "inf", "--gpus-per-trial must be a number >= 0"),
     ("--set", "refiner.kind=none", "--set refiner.kind=none conflicts with search space 'smoke'"),  # trials erred
     ("--set", "model.encoder=nosuch", "unknown encoder 'nosuch'"),  # every trial errored, exit 0
     ("--space", "", "--space: empty path"),  # was the smoke space
     ("--seed", "-1", "--seed must be an integer in 0 .. 2**32 - 1"),  # Optuna failed on it after Ray started
     ("--seed", str(2**32), "--seed must be an integer in 0 .. 2**32 - 1"),
     ("--name", "a" * 250, "--name must be a folder name of at most 200 characters"),  # the lock file's name
     ("--max-failures", "-1", "--max-failures must be an integer >= 0"),
     ("--objective", "accuracy", "--objective takes miou, latency"),
     ("--metric", "nosuch", "--metric 'nosuch' is not a metric trials report; valid: coarse_miou")],
)  # fmt: skip
def test_bad_search_flags_are_refused_before_anything_starts(tmp_path, capsys, flag, value, message):
    args = ["search", "--smoke-test", "--storage", str(tmp_path), "--name", "bad", "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", flag, value]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written: no search folder, no MLflow store


def test_driver_callbacks_work_after_the_pickle_ray_restores_them_from(tmp_path, mlflow_sqlite):
    """On --resume Ray restores the run config's callbacks by unpickling them: the tracking callback must
    still close runs, and the listener callback must find this process's live table."""
    import pickle
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from spntune.space import load_space
    from spntune.status import TrialStatus
    from spntune.tracking import TAG_PARENT, TAG_STATUS, TAG_TRIAL
    from spntune.tune import _LISTENERS, ListenerCallback, TrackingCallback

    uri = mlflow_sqlite
    client = MlflowClient(uri)
    experiment = client.create_experiment("spntune")
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={TAG_PARENT: parent, TAG_TRIAL: "t1", TAG_STATUS: "running"})
    space = load_space("smoke")  # train.epochs: 2
    tracking = pickle.loads(pickle.dumps(TrackingCallback(uri, "spntune", parent, space, {})))
    listening = pickle.loads(pickle.dumps(ListenerCallback("this-search", space, {})))
    trial = SimpleNamespace(trial_id="t1", config={"refiner.kind": "none"}, last_result={"epoch": 1})

    tracking.on_trial_complete(0, [], trial)  # ended after 1 of 2 epochs: stopped early
    run = client.get_run(child.info.run_id)
    assert (run.info.status, run.data.tags[TAG_STATUS]) == ("KILLED", "stopped")
    assert run.data.tags["spntune.reason"] == "stopped early by the scheduler after epoch 1"

    events = []
    _LISTENERS["this-search"] = SimpleNamespace(trial_event=lambda *event: events.append(event))
    try:
        listening.on_trial_result(0, [], trial, {"epoch": 1, "refined_miou": 0.5})
        listening.on_trial_error(0, [], trial)
    finally:
        _LISTENERS.pop("this-search")
    assert [(e[0], e[2]) for e in events] == [("t1", TrialStatus.RUNNING), ("t1", TrialStatus.ERROR)]
    assert events[0][1]["refiner.kind"] == "none" and events[0][3]["epoch"] == 1


def test_a_running_search_holds_its_name(tmp_path, capsys):
    """While a search runs, a second one with the same --name and --storage (or a --resume of it) is
    refused and writes nothing; the lock goes with the process that held it."""
    from spntune.search_options import SearchOptions, search_lock
    from spntune.space import load_space

    storage = tmp_path / "ray"
    opts = SearchOptions(space=load_space("smoke"), name="busy", storage=storage)
    args = ["search", "--smoke-test", "--storage", str(storage), "--name", "busy", "--no-mlflow", *TINY]
    with search_lock(opts):  # as a running search holds it
        for extra in ([], ["--resume"]):
            if extra:
                (storage / "busy").mkdir()  # the running search's folder
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err
            assert f"the search 'busy' in {storage} is running now (pid {os.getpid()} on" in err, err
            assert "Traceback" not in err
        assert sorted(p.name for p in storage.iterdir()) == [".busy.lock", "busy"]
        assert list((storage / "busy").iterdir()) == []  # nothing written into the running search
    with search_lock(opts):  # released with the holder
        pass


def test_a_running_search_is_refused_before_torch_and_ray_load(tmp_path):
    """The lock is probed with the other checks: a second search (or a --resume) of a running one is refused
    at once, not after importing Ray (9-14 s here)."""
    from spntune.search_options import SearchOptions, search_lock
    from spntune.space import load_space

    storage = tmp_path / "ray"
    opts = SearchOptions(space=load_space("smoke"), name="busy", storage=storage)
    code = (
        "import sys; from spntune.cli import main; "
        f"rc = main(['search', '--smoke-test', '--storage', '{storage}', '--name', 'busy', '--no-mlflow']); "
        "print(rc, sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    with search_lock(opts):  # as a running search holds it, from another process
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr
    assert "the search 'busy'" in done.stderr and "is running now" in done.stderr


@pytest.mark.slow  # two real searches racing, 24-41 s: make test-slow
def test_two_searches_started_at_once_with_one_name(tmp_path):
    """Two real searches race for one name: exactly one runs, the other is refused (exit 2, no
    traceback), and the one that ran is whole."""
    args = [*SPNTUNE, "search", "--smoke-test", "--trials", "1", "--scheduler", "none", "--storage", str(tmp_path),
            "--name", "race", "--no-mlflow", *TINY]  # fmt: skip
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=900), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in outs) == [0, 2], outs
    _, _, refused = next(o for o in outs if o[0] == 2)
    assert "Traceback" not in refused
    assert "is running now" in refused or "already exists" in refused, refused
    (row,) = leaderboard(tmp_path / "race")
    assert row["status"] == "completed"


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", "with space"])
def test_search_names_must_be_folder_names(tmp_path, capsys, name):
    assert main(["search", "--smoke-test", "--storage", str(tmp_path), "--name", name, "--no-mlflow"]) == 2
    assert "--name must be a folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_data_is_refused_before_ray_starts(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "masks" / "val" / "img1.png").unlink()
    storage = tmp_path / "ray"
    args = ["search", "--smoke-test", "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--set", "data.name=folder", "--set", f"data.root={data}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "img1.png has no mask: expected" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no storage, no MLflow store
    code = f"import sys; from spntune.cli import main; rc = main({args!r}); print(rc, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr  # listed without torch (8-9 s before)


def test_a_ray_that_cannot_start_leaves_no_search_folder_and_no_mlflow_run(tmp_path, capsys, monkeypatch):
    """Ray starts before the MLflow parent run is opened: a Ray that fails leaves nothing behind, so the same
    command can simply be run again (a folder without Ray's state could be neither started nor resumed)."""
    import spntune.tune
    from spntune.errors import ClusterError

    def no_ray(address: str | None) -> bool:
        raise ClusterError("could not start or reach a local Ray: no space left on device")

    monkeypatch.setattr(spntune.tune, "_init_ray", no_ray)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "--smoke-test", "--storage", str(tmp_path / "ray"), "--name", "x", "--tracking-uri", uri]
    assert main(args) == 2
    assert "could not start or reach a local Ray" in capsys.readouterr().err
    assert not (tmp_path / "ray" / "x").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no parent run: MLflow was never opened


def test_a_search_that_fails_before_ray_saved_it_leaves_no_folder_and_no_running_run(tmp_path, capsys, monkeypatch):
    """A failure after Ray started and the parent run opened, before Ray wrote the search's state (once
    an out-of-range seed failed in Optuna there): the parent run ends FAILED with the reason, and no
    folder is left that could be neither started again nor resumed."""
    import spntune.tune

    def broken_sampler(seed: int, trials: int) -> None:
        raise ValueError("Seed must be between 0 and 2**32 - 1")

    monkeypatch.setattr(spntune.tune, "tpe_sampler", broken_sampler)
    monkeypatch.setattr(spntune.tune, "_init_ray", lambda address: False)  # the failure comes first: no Ray needed
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "--smoke-test", "--storage", str(tmp_path / "ray"), "--name", "x", "--tracking-uri", uri]
    with pytest.raises(ValueError, match="Seed must be"):
        main(args)
    assert not (tmp_path / "ray" / "x").exists()
    _, parents, _ = mlflow_runs(uri)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert parents[0].data.tags["spntune.reason"] == "ValueError: Seed must be between 0 and 2**32 - 1"


def test_storage_under_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["search", "--smoke-test", "--storage", str(blocker / "ray"), "--no-mlflow"]) == 2
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_staging_folders_of_dead_trial_processes_are_swept(tmp_path):
    from spntune.tune import STAGING_PREFIX, sweep_stale_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: a worker killed by SIGKILL leaves such a folder
    gone = tmp_path / f"{STAGING_PREFIX}{dead_pid}-abc"
    (gone / "checkpoint").mkdir(parents=True)
    (gone / "checkpoint" / "checkpoint.pt").write_bytes(b"x" * 1024)
    alive = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def"  # a trial still running on this node
    alive.mkdir()
    other = tmp_path / "spntune-trial-notapid"
    other.mkdir()
    assert sweep_stale_staging(tmp_path) == [gone]
    assert not gone.exists() and alive.exists() and other.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/environ")
def test_ray_workers_start_with_the_malloc_settings(monkeypatch):
    """The Ray that a search starts hands its workers allocator.py's settings in their environment at
    process start (/proc/self/environ: what glibc read), as a trial needs them."""
    import ray

    from spntune import allocator
    from spntune.tune import _init_ray

    for var in allocator.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    expected = allocator.worker_env()
    if not expected:
        pytest.skip("glibc's malloc only")
    assert not ray.is_initialized()  # else _init_ray would keep that Ray's runtime environment

    @ray.remote
    def start_environment() -> bytes:
        with open("/proc/self/environ", "rb") as fh:
            return fh.read()

    assert _init_ray(None) is True  # started it: run_search shuts down only a Ray it started
    try:
        assert _init_ray(None) is False  # already up: kept as it is
        environ = ray.get(start_environment.remote(), timeout=120).split(b"\0")
    finally:
        ray.shutdown()
    assert {f"{k}={v}".encode() for k, v in expected.items()} <= set(environ)
