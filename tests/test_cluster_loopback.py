"""A real Ray cluster with token authentication on 127.0.0.1, as cluster.yaml starts one: a job without
the token is refused, one with it is accepted, and a 2-trial search runs through it as a Ray job.

The cluster gets its own ports and --temp-dir, and every process it starts carries a marker in its
environment; teardown ends exactly those processes (never `ray stop`, which ends every Ray here).
"""

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from fixtures import end_processes, free_port

RAY = str(Path(sys.executable).parent / "ray")
TINY = ["--set", "data.train_size=8", "--set", "data.val_size=4", "--set", "data.limit_train=8",
        "--set", "data.limit_val=4"]  # fmt: skip
MARKER = "SPNTUNE_LOOPBACK_CLUSTER"

pytestmark = pytest.mark.slow  # 1.5-3 min on 2 busy cores (Ray start, a job, two trials): make test-slow


def dashboard_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # not listening yet


@pytest.fixture
def token_cluster(tmp_path):
    """`ray start --head` on 127.0.0.1 with RAY_AUTH_MODE=token and a token made by `ray get-auth-token
    --generate` in a throwaway home; yields the dashboard address and the environment that holds the token."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    generated = subprocess.run([RAY, "get-auth-token", "--generate"], env={**env, "HOME": str(home)},
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token and token in generated.stdout
    tag = uuid.uuid4().hex
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), MARKER: tag}
    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0",
            "--disable-usage-stats"]  # fmt: skip
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while dashboard_status(f"{url}/api/version", token) != 200:
            assert time.monotonic() < deadline, "the dashboard did not answer within 120 s"
            time.sleep(0.5)
        yield url, env, token
    finally:
        end_processes(tag, MARKER)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(url: str, env: dict[str, str], *entrypoint: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", url, "--", *entrypoint], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_token_cluster_refuses_jobs_without_the_token_and_runs_a_search(token_cluster, tmp_path):
    url, env, token = token_cluster
    assert dashboard_status(f"{url}/api/jobs/", None) == 401  # the Jobs API itself
    assert dashboard_status(f"{url}/api/jobs/", "not-the-token") == 403

    # no token: refused before anything runs
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    refused = submit(url, no_token, "echo", "ran-without-token")
    assert refused.returncode != 0 and "ran-without-token" not in refused.stdout
    assert "401" in refused.stdout + refused.stderr or "Authentication required" in refused.stdout + refused.stderr
    wrong = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * len(token)}
    refused = submit(url, wrong, "echo", "ran-with-a-wrong-token")
    assert refused.returncode != 0 and "ran-with-a-wrong-token" not in refused.stdout

    # with the token: a 2-trial search, submitted as the README does, runs on the cluster
    storage, db = tmp_path / "ray", tmp_path / "mlflow.db"
    search = [sys.executable, "-m", "spntune.cli", "search", "--smoke-test", "--address", "auto", "--scheduler", "none",
              "--concurrency", "2", "--cpus-per-trial", "1", "--storage", str(storage), "--name", "loopback",
              "--tracking-uri", f"sqlite:///{db}", *TINY]  # fmt: skip
    accepted = submit(url, env, *search, timeout=600)
    output = accepted.stdout + accepted.stderr
    assert accepted.returncode == 0, output
    assert "submitted successfully" in output and "succeeded" in output
    assert "2 trials" in output and f"--tracking-uri sqlite:///{db}" in output  # closing lines: the store used
    with (storage / "loopback" / "leaderboard.csv").open() as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["completed", "completed"]
    assert token not in output
