import os
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


@pytest.fixture(autouse=True)
def _no_mallopt_in_the_test_process(monkeypatch):
    """Tests call ``spntune train`` / ``evaluate`` / ``predict`` in this process, and those set glibc's
    malloc for their whole process (allocator.py): that would change the rest of the session's memory
    behaviour with the order of the tests. Here ``mallopt`` is not called; everything before it runs
    (a bad SPNTUNE_MALLOC_REUSE is still refused), Ray workers still get the settings, and
    tests/test_allocator.py measures the real calls in processes of their own."""
    from spntune import allocator

    monkeypatch.setattr(allocator, "_mallopt", lambda param, value: True)
