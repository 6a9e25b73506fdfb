"""glibc malloc settings (allocator.py): freed memory is reused instead of paged in again.

The effect is measured in fresh processes by counting minor page faults, which do not depend on the
machine's load: 80 MB blocks allocated, written and freed in a loop, in the main thread or in a thread
as Ray Tune runs a trial. ``mallopt`` changes a whole process, so it never runs in the test process.
"""

import os
import subprocess
import sys

import pytest

from spntune import allocator
from spntune.cli import main
from spntune.errors import ConfigError

glibc = pytest.mark.skipif(not allocator._glibc(), reason="glibc's malloc only")

_PROBE = r"""
import ctypes, resource, sys, threading
mode, where = sys.argv[1], sys.argv[2]
if mode == "mallopt":
    from spntune.allocator import reuse_freed_memory
    assert reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 80 << 20  # over 64 MB: beyond a thread arena's heap, and beyond any mmap threshold
faults = []
def loop():
    for i in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)  # every page written, as a tensor's first use does
        libc.free(p)
        if i:  # the first round pages the memory in either way
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if where == "thread":
    t = threading.Thread(target=loop)
    t.start()
    t.join()
else:
    loop()
print(sum(faults))
"""


def _faults(mode: str, where: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.ENV_VAR}
    if mode == "env":
        env |= allocator.worker_env()
    proc = subprocess.run([sys.executable, "-c", _PROBE, "mallopt" if mode == "mallopt" else "none", where],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@glibc
def test_the_settings_stop_freed_blocks_from_being_paged_in_again(monkeypatch):
    for var in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", allocator.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    # 5 rounds of 80 MB: 102,400 faults of 4 KB pages where every round maps its block afresh (fewer
    # where the kernel hands out huge pages); with the settings the block is the same heap memory.
    default_main, default_thread = _faults("none", "main"), _faults("none", "thread")
    assert default_main > 1000 and default_thread > 1000
    # In the process's own thread, by mallopt (spntune train / evaluate / predict) ...
    assert _faults("mallopt", "main") * 10 < default_main
    # ... and from the environment at start, in a thread, as a Ray trial runs (tune.py's runtime env):
    # without MALLOC_ARENA_MAX=1 the thread's arena would map the block afresh every round.
    assert _faults("env", "thread") * 10 < default_thread
    assert _faults("mallopt", "thread") * 10 < default_thread  # a thread started after mallopt


@glibc
def test_worker_env_keeps_the_users_own_values_and_can_be_turned_off(monkeypatch):
    for var in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", allocator.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    assert allocator.worker_env() == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    }
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's: workers inherit it
    assert "MALLOC_ARENA_MAX" not in allocator.worker_env() and len(allocator.worker_env()) == 2
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert allocator.worker_env() == {} and allocator.reuse_freed_memory() is False


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_a_bad_setting_is_refused_before_anything_runs(monkeypatch, tmp_path, capsys, value):
    monkeypatch.setenv(allocator.ENV_VAR, value)
    with pytest.raises(ConfigError, match=f"SPNTUNE_MALLOC_REUSE must be 1 .* or 0 .*, got {value!r}"):
        allocator.enabled()
    for argv in (["train", "--smoke-test", "--output", str(tmp_path / "t")],
                 ["search", "--smoke-test", "--storage", str(tmp_path / "s"), "--no-mlflow"],
                 ["predict", "--checkpoint", str(tmp_path / "none.pt"), "x.jpg", "--out", str(tmp_path / "p")],
                 ["evaluate", "--checkpoint", str(tmp_path / "none.pt")]):  # fmt: skip
        assert main(argv) == 2
        assert "SPNTUNE_MALLOC_REUSE must be 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
