"""glibc malloc settings (allocator.py): freed memory is reused instead of paged in again.

The effect is measured in fresh processes by counting minor page faults, which do not depend on the
machine's load: 80 MB blocks allocated, written and freed in a loop, in the main thread or in a thread
as Ray Tune runs a trial, with transparent huge pages off for the process (4 KB pages: the counts do
not depend on the machine's THP setting). ``mallopt`` changes a whole process, so it never runs in the
test process (conftest.py).
"""

import subprocess
import sys

import pytest

from spntune import allocator
from spntune.cli import main
from spntune.errors import ConfigError

glibc = pytest.mark.skipif(not allocator.is_glibc(), reason="glibc's malloc only")

_PROBE = r"""
import ctypes, resource, sys, threading
mode, where = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL("libc.so.6")
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages, whatever the machine's THP setting
if mode == "mallopt":
    from spntune.allocator import reuse_freed_memory
    assert reuse_freed_memory()
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


def _faults(mode: str, where: str, without: str = "") -> int:
    """Page faults of rounds 2-6; ``mode``: none (glibc's defaults), mallopt, or env (the settings in the
    environment at start, but for the variable ``without``)."""
    env = allocator.defaults_env()
    if mode == "env":
        env |= {var: value for var, value in allocator.settings_env().items() if var != without}
    proc = subprocess.run([sys.executable, "-c", _PROBE, "mallopt" if mode == "mallopt" else "none", where],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@glibc
def test_the_settings_stop_freed_blocks_from_being_paged_in_again(monkeypatch):
    for var in allocator.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    # 5 rounds of 80 MB: 102,400 faults of 4 KB pages where every round maps its block afresh; with the
    # settings the block is the same heap memory (0 faults on the EPYC VM).
    default_main, default_thread = _faults("none", "main"), _faults("none", "thread")
    assert default_main > 90_000 and default_thread > 90_000
    # In the process's own thread, by mallopt (spntune train / evaluate / predict) ...
    assert _faults("mallopt", "main") < default_main / 10
    # ... and from the environment at start, in a thread, as a Ray trial runs (tune.py's runtime env).
    assert _faults("env", "thread") < default_thread / 10
    assert _faults("mallopt", "thread") < default_thread / 10  # a thread started after mallopt
    # Without MALLOC_ARENA_MAX=1 the thread's own arena maps every block over 64 MB afresh regardless.
    assert _faults("env", "thread", without="MALLOC_ARENA_MAX") > default_thread / 2


@glibc
def test_worker_env_passes_the_users_own_values_on_and_can_be_turned_off(monkeypatch):
    for var in allocator.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert allocator.worker_env() == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    }
    made = []
    monkeypatch.setattr(allocator, "_mallopt", lambda param, value: made.append((param, value)) or True)
    assert allocator.reuse_freed_memory() and made == [(-8, 1), (-4, 0), (-1, 2**31 - 1)]
    # The user's own value wins: a cluster's workers get it from here, and mallopt leaves it alone
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.worker_env()["MALLOC_ARENA_MAX"] == "4"
    made.clear()
    assert allocator.reuse_freed_memory() and made == [(-4, 0), (-1, 2**31 - 1)]
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    made.clear()
    assert allocator.worker_env() == {} and allocator.reuse_freed_memory() is False and made == []


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
