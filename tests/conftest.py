import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def _empty_mlflow_database(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables and nothing else, made once per session: MLflow creates a new
    database by running its schema migrations, 3-6 s on 2 cores, which a dozen tests would each pay. The
    smoke search test still has spntune create its database, as a first search does."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def mlflow_sqlite(tmp_path, _empty_mlflow_database) -> str:
    """Tracking URI of a fresh MLflow database of this test's own (``tmp_path/mlflow.db``, a copy of the
    empty one: no experiment but MLflow's Default, no run)."""
    target = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_database, target)
    return f"sqlite:///{target}"


@pytest.fixture(autouse=True)
def _no_mallopt_in_the_test_process(monkeypatch):
    """Tests call ``spntune train`` / ``evaluate`` / ``predict`` in this process, and those set glibc's
    malloc for their whole process (allocator.py): that would change the rest of the session's memory
    behaviour with the order of the tests. Here ``mallopt`` is not called; everything before it runs
    (a bad SPNTUNE_MALLOC_REUSE is still refused), Ray workers still get the settings, and
    tests/test_allocator.py measures the real calls in processes of their own."""
    from spntune import allocator

    monkeypatch.setattr(allocator, "_mallopt", lambda param, value: True)
