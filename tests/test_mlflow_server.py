"""The search's own MLflow server (scripts/mlflow-server.sh, as cluster.yaml starts it on the head): basic
auth, artifacts proxied by the server, and a real search logging to it with credentials from the
environment, on loopback."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mlflow-server.sh"
SPNTUNE = [sys.executable, "-m", "spntune.cli"]
TINY = ["--set", "data.train_size=8", "--set", "data.val_size=4", "--set", "data.limit_train=8",
        "--set", "data.limit_val=4"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def http_status(url: str, login: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def mlflow_server(tmp_path):
    """The server as cluster.yaml starts it, bound to 127.0.0.1 on a free port; stopped by its pid file."""
    port = free_port()
    env = {**os.environ, "SPNTUNE_MLFLOW_HOME": str(tmp_path / "server"), "SPNTUNE_MLFLOW_HOST": "127.0.0.1",
           "SPNTUNE_MLFLOW_PORT": str(port), "SPNTUNE_MLFLOW_WORKERS": "1",
           "SPNTUNE_MLFLOW_ARTIFACTS": str(tmp_path / "shared" / "artifacts"),
           "SPNTUNE_CREDENTIALS": str(tmp_path / "home" / ".spntune" / "mlflow.env"), "SPNTUNE_PYTHON": sys.executable}  # fmt: skip
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(var, None)
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{port}", tmp_path, started.stdout + started.stderr
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


def closing_lines(uri: str, monkeypatch, cwd: Path) -> str:
    from rich.console import Console

    from spntune.console import print_search_summary
    from spntune.leaderboard import SearchSummary

    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    console = Console(record=True, width=100)
    summary = SearchSummary([], cwd / "runs", "refined_miou", 1.0, parent_run_id="abc123", tracking_uri=uri)
    print_search_summary(summary, top=5, console=console)
    return console.export_text()


@pytest.mark.parametrize(
    ("uri", "expected", "absent"),
    [
        ("{cwd}/mlflow_runs/mlflow.db", "browse it: spntune ui   (then open http://127.0.0.1:5000", "--tracking-uri"),
        ("sqlite:////data/runs.db", "browse it: spntune ui --tracking-uri sqlite:////data/runs.db", "***"),
        ("http://127.0.0.1:5917", "browse it: open http://127.0.0.1:5917 in a browser", "spntune ui"),
        ("http://admin:hunter2@10.0.0.5:5000", "ssh -L 5000:10.0.0.5:5000 <head>", "hunter2"),
        ("postgresql://u:hunter2@db/mlflow", "spntune ui --tracking-uri 'postgresql://u:***@db/mlflow'", "hunter2"),
    ],
)
def test_closing_lines_name_the_store_used_and_how_to_browse_it(uri, expected, absent, monkeypatch, tmp_path):
    uri = uri.replace("{cwd}/", f"sqlite:///{tmp_path}/")
    text = closing_lines(uri, monkeypatch, tmp_path)
    assert expected in text and absent not in text
    assert "MLflow: search run abc123 at " in text


@pytest.mark.slow  # 2-4 min on 2 busy cores (server start, two trials logging through it): make test-slow
def test_search_logs_through_an_authenticated_server(mlflow_server):
    uri, tmp_path, start_output = mlflow_server
    credentials = tmp_path / "home" / ".spntune" / "mlflow.env"
    login = read_env_file(credentials)  # generated at first start, outside any repository
    user, password = login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]
    assert user == "admin" and len(password) >= 32 and credentials.stat().st_mode & 0o077 == 0
    assert password not in start_output

    # nobody without the login gets in
    search_api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search_api) == 401
    assert http_status(search_api, (user, "not-the-password")) == 401
    assert http_status(search_api, (user, password)) == 200

    # a 2-trial search (Ray on this machine) with the login in the environment only, as on a cluster node
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    storage = tmp_path / "ray"
    env = {**os.environ, **login, "RAY_TMPDIR": ray_tmp}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["search", "--smoke-test", "--scheduler", "none", "--storage", str(storage), "--name", "authed",
            "--tracking-uri", uri, "--set", "train.viz_samples=1", *TINY]  # fmt: skip
    try:
        out = subprocess.run([*SPNTUNE, *args], capture_output=True, text=True, env=env, timeout=600)
        output = out.stdout + out.stderr
        assert out.returncode == 0, output
        # the closing lines name the server actually used and its own UI, not `spntune ui`
        assert f"at {uri}" in out.stdout and f"browse it: open {uri} in a browser" in out.stdout
        assert "spntune ui" not in out.stdout

        # the password is in no output and no file the search or the server wrote
        assert password not in output
        leaked = [p for folder in (storage, Path(ray_tmp), tmp_path / "server", tmp_path / "shared")
                  for p in folder.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]  # fmt: skip
        assert not leaked
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # every trial's mask panels arrived through the server: proxied artifact URIs, files in its store
    os.environ.update(login)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("spntune")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        for child in children:
            assert child.info.artifact_uri.startswith("mlflow-artifacts:/"), child.info.artifact_uri
            panels = {f.path for f in client.list_artifacts(child.info.run_id, "panels")}
            assert {"panels/panel_000.png", "panels/steps_000.png"} <= panels
            local = client.download_artifacts(
                child.info.run_id, "panels/panel_000.png", str(tmp_path / child.info.run_id)
            )
            assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            stored = list(
                (tmp_path / "shared" / "artifacts").rglob(f"{child.info.run_id}/artifacts/panels/panel_000.png")
            )
            assert stored and stored[0].read_bytes() == Path(local).read_bytes()
    finally:
        for var in login:
            os.environ.pop(var, None)
