"""Faults during a real search: a trial's worker killed by pid, the driver interrupted, the MLflow
tracking server stopped and started again. Each waits on what the search writes (never a fixed sleep)
and asserts what a user reads afterwards: the leaderboard, history.csv and the MLflow runs."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search import SPNTUNE, TINY, _results, history, leaderboard, mlflow_runs


def _wait(condition, what: str, seconds: float = 300, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _trial_results(experiment: Path) -> dict[str, list[dict]]:
    return {d.name: _results(d) for d in experiment.glob("run_trial_*") if d.is_dir()} if experiment.is_dir() else {}


def _epochs_in_mlflow(client, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "epoch_seconds"))


def _start_search(args: list[str], tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / "search.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*SPNTUNE, *args], start_new_session=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, tmp_path: Path, seconds: float = 400) -> str:
    try:
        proc.wait(timeout=seconds)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return (tmp_path / "search.log").read_text()


@pytest.mark.slow  # 1.5-2 min on 2 cores: make test-slow
def test_worker_killed_mid_epoch_is_retried_from_its_checkpoint(tmp_path):
    """SIGKILL to the trial's worker process (its pid from the trial's results) while it trains epoch 2:
    Ray retries the trial from its epoch-1 checkpoint in a new worker; the leaderboard, history.csv and
    the MLflow run hold every epoch exactly once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "ray"
    args = ["search", "--smoke-test", "--trials", "1", "--scheduler", "none", "--max-failures", "1",
            "--storage", str(storage), "--name", "kill", "--tracking-uri", uri, *TINY,
            "--set", "train.epochs=4", "--set", "data.train_size=32", "--set", "data.limit_train=32"]  # fmt: skip
    proc = _start_search(args, tmp_path)
    experiment = storage / "kill"
    try:
        first = _wait(lambda: next((r[0] for r in _trial_results(experiment).values() if r), None),
                      "the trial's first epoch", proc=proc)  # fmt: skip
        os.kill(int(first["pid"]), signal.SIGKILL)  # the worker, now in epoch 2
    finally:
        out = _finish(proc, tmp_path)
    assert proc.returncode == 0, out
    ((_trial, results),) = _trial_results(experiment).items()
    assert len({r["pid"] for r in results}) == 2, results  # a second worker finished the trial
    (row,) = leaderboard(experiment)
    assert row["status"] == "completed" and row["epochs"] == "4"
    assert [int(h["epoch"]) for h in history(experiment)[row["trial_id"]]] == [1, 2, 3, 4]
    client, parents, children = mlflow_runs(uri)
    (child,) = children
    assert child.info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    assert _epochs_in_mlflow(client, child.info.run_id) == [1, 2, 3, 4]  # each epoch exactly once


@pytest.mark.slow  # 1.5-2 min on 2 cores: make test-slow
def test_interrupted_driver_resumes_and_every_trial_completes_once(tmp_path):
    """Ctrl-C (SIGINT to the driver's process group) part-way through a search: the driver exits
    without a traceback and leaves no MLflow run RUNNING; ``--resume`` completes every trial once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "ray"
    args = ["search", "--smoke-test", "--trials", "3", "--concurrency", "1", "--scheduler", "none",
            "--storage", str(storage), "--name", "intr", "--tracking-uri", uri, *TINY, "--set", "train.epochs=3"]  # fmt: skip
    proc = _start_search(args, tmp_path)
    experiment = storage / "intr"

    def one_done_one_started() -> bool:
        epochs = sorted(len(r) for r in _trial_results(experiment).values())
        return epochs.count(3) >= 1 and any(0 < e < 3 for e in epochs)

    try:
        _wait(one_done_one_started, "one finished trial and one part-way", proc=proc)
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        out = _finish(proc, tmp_path, seconds=180)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert "interrupted: 2 of 3 trials started; run the same command with --resume" in out
    assert "Tuner.restore" not in out  # Ray's hint is for Ray's API, not for spntune's users
    rows = {r["trial_id"]: r["status"] for r in leaderboard(experiment)}
    assert sorted(rows.values()) == ["completed", "interrupted"], rows
    client, parents, children = mlflow_runs(uri)
    assert [p.info.status for p in parents] == ["KILLED"]  # nothing left RUNNING
    statuses = {c.data.tags["spntune.ray_trial_id"]: (c.info.status, c.data.tags["spntune.status"]) for c in children}
    assert statuses == {t: ("FINISHED" if s == "completed" else "KILLED", s) for t, s in rows.items()}, statuses

    resumed = subprocess.run([*SPNTUNE, *args, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = leaderboard(experiment)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows), rows
    for epochs in history(experiment).values():
        assert [int(h["epoch"]) for h in epochs] == [1, 2, 3]
    client, parents, children = mlflow_runs(uri)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert _epochs_in_mlflow(client, child.info.run_id) == [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")]  # fmt: skip
    log = (tmp_path / "server.log").open("a")
    server = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def up() -> bool:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    _wait(up, "the MLflow server to listen", seconds=120)
    return server


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow  # 1.5-2 min on 2 cores: make test-slow
def test_mlflow_server_down_mid_search_loses_nothing(tmp_path):
    """A real ``mlflow server`` stopped after a trial's first epoch and started again later: training
    goes on while it is down; at the end every trial's run holds every epoch exactly once, and whatever
    MLflow still lacks (a best checkpoint logged while it was down) is named in the summary."""
    port = _free_port()
    server = _start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    storage = tmp_path / "ray"
    args = ["search", "--smoke-test", "--trials", "2", "--concurrency", "1", "--scheduler", "none",
            "--storage", str(storage), "--name", "down", "--tracking-uri", uri, *TINY, "--set", "train.epochs=3"]  # fmt: skip
    proc = _start_search(args, tmp_path)
    experiment = storage / "down"
    try:
        _wait(lambda: any(_trial_results(experiment).values()), "a trial's first epoch", proc=proc)
        _stop(server)
        reported = sum(len(r) for r in _trial_results(experiment).values())
        # training goes on without the tracking server (or the search reaches its end and waits for it)
        _wait(lambda: sum(len(r) for r in _trial_results(experiment).values()) > reported or proc.poll() is not None,
              "an epoch reported while MLflow is down")  # fmt: skip
        server = _start_mlflow_server(tmp_path, port)
        out = _finish(proc, tmp_path)
        assert proc.returncode == 0, out
        client, parents, children = mlflow_runs(uri)
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), out
        for child in children:
            assert _epochs_in_mlflow(client, child.info.run_id) == [1, 2, 3], out
            if not client.list_artifacts(child.info.run_id, "checkpoint"):  # lost while down: the summary says so
                assert f"trial {child.data.tags['spntune.ray_trial_id']}: no best checkpoint" in out, out
        assert len(leaderboard(experiment)) == 2
    finally:
        _stop(server)
