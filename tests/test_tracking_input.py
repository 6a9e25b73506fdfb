"""Bad input to the commands that read MLflow (`best`, `ui`, `predict --run`, `evaluate --run`): each is
refused with one `spntune: error:` paragraph naming the URI, path, port or flag -- no traceback, nothing
created, and `spntune ui` refuses before its banner and without starting a server."""

import shutil
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spntune.tracking as tracking
from spntune.cli import main


@pytest.fixture
def in_empty_folder(tmp_path, monkeypatch) -> Path:
    """The working folder is an empty one and no MLFLOW_TRACKING_URI applies: the default store is ./mlflow_runs."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return folder


@pytest.fixture
def no_server(monkeypatch):
    """`spntune ui` must refuse before it starts the MLflow server."""

    def serve(*args, **kwargs):
        raise AssertionError("the MLflow server was started")

    monkeypatch.setattr(tracking, "serve_ui", serve)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def _refused(capsys, *expected: str) -> str:
    err = capsys.readouterr()
    assert "Traceback" not in err.err and "Creating initial MLflow database tables" not in err.err
    assert err.err.startswith("spntune: error: ")
    for text in expected:
        assert text in err.err, err.err
    return err.out


def _listening(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


# --- spntune ui: port and host ---


def test_ui_refuses_a_port_in_use_before_its_banner(mlflow_sqlite, capsys, no_server):
    with _listening() as held:
        port = held.getsockname()[1]
        assert main(["ui", "--tracking-uri", mlflow_sqlite, "--port", str(port)]) == 2
    out = _refused(capsys, f"port {port} on 127.0.0.1 is in use", "pick a free one with --port, e.g. --port ")
    assert "MLflow UI" not in out  # no banner


@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_ui_refuses_a_port_outside_1_65535(mlflow_sqlite, capsys, no_server, port):
    assert main(["ui", "--tracking-uri", mlflow_sqlite, "--port", port]) == 2
    assert "MLflow UI" not in _refused(capsys, f"--port must be an integer 1-65535, got {port}")


@pytest.mark.parametrize(
    ("host", "message"),
    [("999.1.1.1", "is not an IPv4 address"), ("192.0.2.1", "is not an address of this machine")],  # TEST-NET-1
)
def test_ui_refuses_a_host_it_cannot_listen_on(mlflow_sqlite, capsys, no_server, host, message):
    assert main(["ui", "--tracking-uri", mlflow_sqlite, "--host", host]) == 2
    assert "MLflow UI" not in _refused(capsys, f"--host '{host}' {message}", "127.0.0.1")


def test_ui_reports_a_server_that_stops_by_itself(mlflow_sqlite, capsys, monkeypatch):
    """`mlflow server` exits 0 even when its web server cannot bind (a port taken after the check): a server
    that ends without Ctrl-C is a failure. Ctrl-C still ends `spntune ui` with 0."""
    import subprocess

    with _listening() as probe:  # a port free a moment ago; check_ui binds it itself
        port = probe.getsockname()[1]
    returns = iter([subprocess.CompletedProcess([], 0), subprocess.CompletedProcess([], 3)])

    def run(cmd, check):
        assert cmd[cmd.index("--port") + 1] == str(port)
        return next(returns)

    monkeypatch.setattr(tracking.subprocess, "run", run)
    assert main(["ui", "--tracking-uri", mlflow_sqlite, "--port", str(port)]) == 1
    assert "the MLflow server stopped by itself (exit code 1)" in capsys.readouterr().err
    assert tracking.serve_ui(mlflow_sqlite, port) == 3

    def interrupted(cmd, check):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking.subprocess, "run", interrupted)
    assert tracking.serve_ui(mlflow_sqlite, port) == 0


def test_ui_serves_an_existing_store_after_the_checks(mlflow_sqlite, capsys, monkeypatch):
    served = []
    monkeypatch.setattr(tracking, "serve_ui", lambda uri, port, host: served.append((uri, port, host)) or 0)
    with _listening() as probe:
        port = probe.getsockname()[1]
    assert main(["ui", "--tracking-uri", mlflow_sqlite, "--port", str(port)]) == 0
    assert served == [(mlflow_sqlite, port, "127.0.0.1")]
    assert f"MLflow UI: http://127.0.0.1:{port}/" in capsys.readouterr().out


# --- a tracking URI that names no readable MLflow store ---


def _damaged_page(db: Path) -> None:
    """Overwrites the experiments table's root page: SQLite still lists the tables; reading it fails."""
    with sqlite3.connect(db) as con:
        page = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'experiments'").fetchone()[0]
    con.close()
    data = bytearray(db.read_bytes())
    data[(root - 1) * page : root * page] = b"\xff" * page
    db.write_bytes(bytes(data))


def _bad_stores(tmp_path: Path, good_db: Path) -> dict[str, list[str]]:
    """Tracking URIs and what the refusal of each must say."""
    (tmp_path / "folder").mkdir(parents=True)
    (tmp_path / "folder" / "mlflow.db").write_bytes(good_db.read_bytes())
    (tmp_path / "random.db").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "truncated.db").write_bytes(good_db.read_bytes()[: good_db.stat().st_size // 2])
    shutil.copyfile(good_db, tmp_path / "damaged.db")
    _damaged_page(tmp_path / "damaged.db")
    (tmp_path / "plain.db").touch()  # an empty SQLite database, not MLflow's
    (tmp_path / "a-file").write_text("x")
    return {
        str(tmp_path / "folder"): ["is a folder: MLflow's old file store", "MLFLOW_ALLOW_FILE_STORE=true",
                                   f"the store in it is sqlite:///{tmp_path / 'folder' / 'mlflow.db'}"],
        f"sqlite:///{tmp_path / 'random.db'}": [f"{tmp_path / 'random.db'} is not a readable SQLite database"],
        f"sqlite:///{tmp_path / 'truncated.db'}": [f"{tmp_path / 'truncated.db'} is not a readable SQLite database"],
        f"sqlite:///{tmp_path / 'damaged.db'}": [f"the MLflow store at sqlite:///{tmp_path / 'damaged.db'} cannot be "
                                                 "read", "database disk image is malformed"],
        f"sqlite:///{tmp_path / 'plain.db'}": ["is a SQLite database but not an MLflow store"],
        f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}": [f"no MLflow store at {tmp_path / 'a-file' / 'mlflow.db'} "
                                                           f"({tmp_path / 'a-file'} is a file, not a folder)"],
        "bogus://x": ["tracking URI 'bogus://x': MLflow has no store for the scheme 'bogus'", "sqlite:///"],
        str(tmp_path / "random.db"): ["is a file's path", f"pass sqlite:///{tmp_path / 'random.db'}"],
        "sqlite://mlflow.db": ["three slashes, then the path"],
        "sqlite:mlflow.db": ["three slashes, then the path"],  # an IndexError before
        "postgresql://u:secret@127.0.0.1:1/db": ["needs the Python package", "u:***@"],  # no driver: a traceback
    }  # fmt: skip


def test_best_refuses_a_tracking_uri_that_names_no_store(tmp_path, in_empty_folder, mlflow_sqlite, capsys):
    stores = _bad_stores(tmp_path / "stores", Path(mlflow_sqlite.removeprefix("sqlite:///")))
    before = _files(tmp_path)
    for uri, expected in stores.items():
        assert main(["best", "--tracking-uri", uri]) == 2, uri
        _refused(capsys, *expected)
    assert _files(tmp_path) == before  # nothing created or changed in size
    assert not (tmp_path / "stores" / "plain.db").stat().st_size  # MLflow did not create its tables in it


def test_a_tracking_server_that_does_not_answer_is_named_without_its_password(in_empty_folder, capsys):
    with socket.socket() as closed:  # bound, never listening: a connection to it is refused
        closed.bind(("127.0.0.1", 0))
        uri = f"http://alice:s3cret@127.0.0.1:{closed.getsockname()[1]}"
        assert main(["best", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spntune: error: no MLflow tracking server answers at {tracking.masked(uri)} (connection")
    assert "s3cret" not in err and "Traceback" not in err


def test_ui_refuses_a_tracking_server_and_a_bad_store(tmp_path, in_empty_folder, mlflow_sqlite, capsys, no_server):
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5000"]) == 2
    assert "MLflow UI" not in _refused(capsys, "http://127.0.0.1:5000 is a tracking server, which has its own UI")
    stores = _bad_stores(tmp_path / "stores", Path(mlflow_sqlite.removeprefix("sqlite:///")))
    # a store MLflow itself fails on (damaged pages, a database server without its driver): the server says why
    for uri in [u for u in stores if "damaged" not in u and not u.startswith("postgresql")]:
        assert main(["ui", "--tracking-uri", uri]) == 2, uri
        assert "MLflow UI" not in _refused(capsys, *stores[uri])


# --- read commands create no store ---


def test_read_commands_create_no_store(tmp_path, in_empty_folder, capsys, no_server):
    """`best` and `ui` on the default store before any search, and `best`, `predict --run`, `evaluate --run`
    on a SQLite file that does not exist: refused by path; no database and no folder appear."""
    assert main(["best"]) == 2
    _refused(capsys, f"no MLflow store at {in_empty_folder / 'mlflow_runs' / 'mlflow.db'}: searches and "
                     "`spntune train --mlflow` write one", "--tracking-uri")  # fmt: skip
    assert main(["ui"]) == 2
    assert "MLflow UI" not in _refused(capsys, f"no MLflow store at {in_empty_folder / 'mlflow_runs' / 'mlflow.db'}")
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    new = tmp_path / "new" / "dir" / "mlflow.db"
    uri = ["--tracking-uri", f"sqlite:///{new}"]
    commands = [["best", *uri], ["predict", "--run", "abc", str(image), "--out", str(tmp_path / "out"), *uri],
                ["evaluate", "--run", "abc", *uri]]  # fmt: skip
    for argv in commands:
        assert main(argv) == 2, argv
        _refused(capsys, f"no MLflow store at {new}")
    assert _files(in_empty_folder) == [] and not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


def test_an_existing_store_is_read_as_before(tmp_path, mlflow_sqlite, capsys, monkeypatch):
    assert main(["best", "--tracking-uri", mlflow_sqlite]) == 2  # read: it holds no experiment 'spntune' yet
    _refused(capsys, f"no MLflow experiment 'spntune' at {mlflow_sqlite}")
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, where the user opts in
    tracking.check_store(str(tmp_path / "mlruns"))
    spaced = tmp_path / "my runs"
    spaced.mkdir()
    shutil.copyfile(mlflow_sqlite.removeprefix("sqlite:///"), spaced / "mlflow.db")
    tracking.check_store(f"sqlite:///{tmp_path}/my%20runs/mlflow.db")  # as MLflow writes a space; SQLAlchemy reads it
    for databricks in ("databricks", "databricks-uc", "uc"):  # MLflow's bare scheme names, not paths
        tracking.check_store(databricks)


# --- best --top ---


@pytest.mark.parametrize("top", ["0", "-3"])
def test_best_refuses_top_below_1_as_search_does(tmp_path, in_empty_folder, capsys, top):
    assert main(["best", "--top", top]) == 2  # refused before the (missing) store is looked at
    _refused(capsys, f"--top must be an integer >= 1, got {top}")
    assert main(["search", "--smoke-test", "--top", top, "--storage", str(tmp_path / "ray")]) == 2
    _refused(capsys, f"--top must be an integer >= 1, got {top}")
    assert _files(in_empty_folder) == []


def test_ui_banner_brackets_an_ipv6_host():
    from rich.console import Console

    from spntune.console import print_ui_banner

    console = Console(width=300, record=True)
    print_ui_banner("sqlite:////x/mlflow.db", "::1", 5001, console)
    text = console.export_text()
    assert "http://[::1]:5001/" in text and "this machine only" in text
