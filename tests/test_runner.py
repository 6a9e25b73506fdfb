"""tests/run.py (what ``make test`` runs) leaves through os._exit: it must still exit with pytest's status and
print pytest's whole report, or a failing suite could look green."""

import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("run.py")


@pytest.mark.parametrize(
    ("body", "status", "summary"),
    [
        ("def test_ok():\n    assert 1 + 1 == 2\n", 0, "1 passed"),
        ("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 + 1 == 3\n", 1, "1 failed, 1 passed"),
        ("def test_ok(:\n", 2, "1 error"),
    ],
    ids=["pass", "fail", "collection-error"],
)
def test_runner_exits_with_pytest_status_and_full_report(tmp_path, body, status, summary):
    (tmp_path / "test_inner.py").write_text(body)
    out = subprocess.run(
        [sys.executable, str(RUNNER), "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == status, out.stdout + out.stderr
    assert summary in out.stdout.splitlines()[-1], out.stdout  # the last line written made it out


def test_runner_refuses_an_unknown_option_with_pytest_usage_status(tmp_path):
    out = subprocess.run([sys.executable, str(RUNNER), "--no-such-option", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 4, out.stdout + out.stderr
    assert "--no-such-option" in out.stderr
