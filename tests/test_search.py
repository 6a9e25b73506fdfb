"""Real Ray Tune + Optuna searches on this machine (tiny trials on synthetic or fixture data)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures import make_folder

from spntune.cli import main

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


def test_smoke_search_two_trials(tmp_path, capsys):
    code = main(["search", "--smoke-test", "--storage", str(tmp_path), "--name", "smoke", "--scheduler", "none", *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out and "2 trials" in out
    rows = leaderboard(tmp_path / "smoke")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    # the seed configuration from smoke.yaml ran first: U-Net + CSPN 3x3, T = 6
    assert any("unet/resnet18 + cspn k3 T6" in r["pipeline"] for r in rows)
    for r in rows:
        assert 0.0 <= float(r["best_refined_miou"]) <= 1.0
        assert any(p.name.startswith("checkpoint_") for p in Path(r["path"]).iterdir())


def test_errored_trial_does_not_stop_the_search(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    space = {
        "name": "err",
        "base": {"data.name": "folder", "data.root": str(data), "data.image_size": [64, 64], "train.epochs": 1,
                 "train.batch_size": 2, "train.viz_samples": 0, "refiner.kind": "none"},
        "params": {"data.val_split": {"choice": ["val", "nosuchsplit"]}},
        "points_to_evaluate": [{"data.val_split": "nosuchsplit"}, {"data.val_split": "val"}],
    }  # fmt: skip
    path = tmp_path / "err.yaml"
    path.write_text(yaml.safe_dump(space))
    args = [
        "search",
        "--space",
        str(path),
        "--trials",
        "2",
        "--storage",
        str(tmp_path / "ray"),
        "--max-failures",
        "0",
        "--scheduler",
        "none",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 errored" in out and "split 'nosuchsplit' not found" in out
    rows = leaderboard(tmp_path / "ray" / "err")
    assert sorted(r["status"] for r in rows) == ["completed", "error"]
    assert "nosuchsplit" in next(r["error"] for r in rows if r["status"] == "error")


def test_existing_name_needs_resume_and_missing_needs_none(tmp_path, capsys):
    (tmp_path / "smoke").mkdir()
    assert main(["search", "--smoke-test", "--storage", str(tmp_path), "--name", "smoke"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["search", "--smoke-test", "--storage", str(tmp_path), "--name", "other", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_resume_after_killing_the_driver(tmp_path):
    storage, name = tmp_path / "ray", "resume"
    args = ["search", "--smoke-test", "--trials", "3", "--concurrency", "1", "--scheduler", "none",
            "--storage", str(storage), "--name", name, "--set", "train.epochs=3", *TINY]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
    finished_before = {d.name: len(_results(d)) for d in experiment.glob("run_trial_*") if len(_results(d)) == 3}
    assert finished_before

    resumed = subprocess.run([*SPNTUNE, *args, "--resume"], capture_output=True, text=True, env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = leaderboard(experiment)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows), rows
    assert len({r["trial_id"] for r in rows}) == 3
    for trial, count in finished_before.items():
        assert len(_results(experiment / trial)) == count  # finished trials were not re-run
    for d in experiment.glob("run_trial_*"):
        epochs = [r["epoch"] for r in _results(d)]
        assert epochs[-1] == 3 and sorted(set(epochs)) == [1, 2, 3]


@pytest.fixture
def two_node_cluster(tmp_path):
    port = 6391
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray = RAY
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
    subprocess.run([ray, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                    "--include-dashboard", "false", *common], check=True, capture_output=True, env=env)  # fmt: skip
    try:
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common],
                       check=True, capture_output=True, env=env)  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)


def test_search_on_a_two_node_cluster(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    args = ["search", "--smoke-test", "--trials", "2", "--concurrency", "2", "--cpus-per-trial", "1", "--scheduler", "none",
            "--address", address, "--storage", str(tmp_path), "--name", "cluster", *TINY]  # fmt: skip
    out = subprocess.run([*SPNTUNE, *args], capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    node_ids = set()
    for d in (tmp_path / "cluster").glob("run_trial_*"):
        node_ids |= {r["node_id"] for r in _results(d)}
    assert len(node_ids) == 2  # one trial on each node
