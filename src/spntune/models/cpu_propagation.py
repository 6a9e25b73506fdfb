"""Fused C++/OpenMP kernels for one propagation step on the CPU (forward and backward).

``propagation.propagate_step`` dispatches here for CPU tensors of float32 / float64 (backend
``"auto"`` or ``"cpp"``). The kernels live in ``propagation_cpu.cpp`` next to this file: plain C++
with no torch headers, built on first use with the system's C++ compiler (``$CXX``, else ``g++``
or ``c++``) into a shared library that is loaded with ctypes (a call releases the GIL).

The build takes a few seconds and is cached: ``$SPNTUNE_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/spntune/kernels``, else ``~/.cache/spntune/kernels`` (a per-user temp folder if
none of these can be written). The file name holds a hash of the source, the compiler, its flags
and this CPU's model and instruction-set flags, so nodes of a cluster that share a home folder
each build their own ``-march=native`` library. One process builds (the others wait on a lock file
next to it, ``filelock.held``), into a temp file renamed into place: the library a process loads is
always whole.

Where no compiler is found or the build fails, ``library()`` returns None once per process with
a warning naming the reason, and ``propagate_step`` keeps the shifted-slice path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from spntune.filelock import held
from spntune.models.fused_propagation import one_step_backward, run_steps
from spntune.models.memory import contiguous, empty_like

__all__ = [
    "FusedCPUStep",
    "backward_step",
    "build_library",
    "dyspn_step_weights",
    "dyspn_step_weights_backward",
    "forward_step",
    "kernel_cache_dir",
    "library",
    "propagate_cpu",
    "propagate_step_cpu",
    "stream_rows",
    "supports",
    "takes",
    "vector_bytes",
]

SOURCE = Path(__file__).with_name("propagation_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_BUILD_TIMEOUT_S = 300
_ABI_VERSION = 11
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}

log = logging.getLogger("spntune.kernels")


class KernelBuildError(RuntimeError):
    """The fused CPU kernel could not be built or loaded (the message says why)."""


def kernel_cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("SPNTUNE_KERNEL_CACHE"):
        return Path(os.environ["SPNTUNE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spntune" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and (path := shutil.which(name)):
            return path
    raise KernelBuildError("no C++ compiler found ($CXX, g++ or c++ on PATH)")


def _cpu_signature() -> str:
    """This CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _library_path(compiler: str, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, " ".join(flags), _cpu_signature()]).encode()
    ).hexdigest()[:20]
    return Path(f"spn_propagation-{key}.so")


def build_library(cache_dir: Path | None = None, defines: tuple[str, ...] = ()) -> Path:
    """Build (or find already built) the kernel library; returns its path. Raises KernelBuildError.

    ``defines``: extra ``-D`` flags, e.g. ``("-DSPN_VBYTES=64",)`` for the vector width this CPU does not get
    by default (tests build it to check both widths on one machine)."""
    compiler = _compiler()
    flags = (*FLAGS, *defines)
    name = _library_path(compiler, flags)
    folders = (
        [cache_dir]
        if cache_dir is not None
        else [kernel_cache_dir(), Path(tempfile.gettempdir()) / f"spntune-kernels-{os.getuid()}"]
    )
    last_error = ""
    for folder in folders:
        target = folder / name
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # One builder per library: the others wait on the lock, then find the file (no N compiles
            # when N trials start on a node at once). The kernel drops the lock if its holder dies.
            with held(folder / f"{name.stem}.lock", log, f"CPU kernels: another process is building {name}"):
                if target.exists():
                    return target
                return _compile(compiler, flags, folder, target)
        except OSError as exc:
            last_error = f"cannot write {folder}: {exc}"
    raise KernelBuildError(last_error)


def _compile(compiler: str, flags: tuple[str, ...], folder: Path, target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        log.info("building the fused CPU propagation kernels into %s", target)
        proc = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
        )
        if proc.returncode != 0:
            raise KernelBuildError(
                f"{Path(compiler).name} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
        os.replace(tmp, target)  # atomic: a reader sees no file or the whole library
        return target
    except subprocess.TimeoutExpired as exc:
        raise KernelBuildError(f"{Path(compiler).name} did not finish in {_BUILD_TIMEOUT_S} s") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.spn_abi_version() != _ABI_VERSION:
        raise KernelBuildError(f"{path} has ABI {lib.spn_abi_version()}, expected {_ABI_VERSION}")
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.spn_stream_rows_f32.argtypes = [ptr, ptr, int_, ptr, ptr, int_, long_, long_, long_, long_, int_]
    lib.spn_stream_rows_f32.restype = ctypes.c_double
    for suffix in _DTYPES.values():
        fwd = getattr(lib, f"spn_forward_{suffix}")
        fwd.argtypes, fwd.restype = [ptr] * 7 + [long_] * 4 + [int_] * 2 + [long_], None
        bwd = getattr(lib, f"spn_backward_{suffix}")
        bwd.argtypes, bwd.restype = [ptr] * 13 + [long_] * 4 + [int_] * 3 + [long_], None
        norm = getattr(lib, f"spn_cspn_normalise_{suffix}")
        norm.argtypes, norm.restype = [ptr] * 5 + [long_] * 3 + [ctypes.c_double, int_], None
        norm_bwd = getattr(lib, f"spn_cspn_normalise_backward_{suffix}")
        norm_bwd.argtypes, norm_bwd.restype = [ptr] * 7 + [long_] * 3 + [ctypes.c_double, int_], None
        rings = getattr(lib, f"spn_ring_sums_{suffix}")
        rings.argtypes, rings.restype = [ptr] * 3 + [long_, int_, long_, int_], None
        rings_bwd = getattr(lib, f"spn_ring_sums_backward_{suffix}")
        rings_bwd.argtypes, rings_bwd.restype = [ptr] * 5 + [long_, int_, long_, long_, int_], None
        step_w = getattr(lib, f"spn_dyspn_step_weights_{suffix}")
        step_w.argtypes, step_w.restype = [ptr] * 6 + [long_] * 3 + [ctypes.c_double, int_], None
        step_w_bwd = getattr(lib, f"spn_dyspn_step_weights_backward_{suffix}")
        step_w_bwd.argtypes, step_w_bwd.restype = [ptr] * 9 + [long_] * 4 + [int_, ctypes.c_double, int_], None
    return lib


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (with one warning) where it cannot be."""
    try:
        return _load(build_library())
    except (KernelBuildError, OSError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"spntune: the fused CPU propagation kernel is unavailable ({exc}); propagation runs the slower "
            "shifted-slice path. SPNTUNE_PROPAGATION=torch chooses that path without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def vector_bytes(lib: ctypes.CDLL | None = None) -> int | None:
    """Bytes per vector the kernels were built with (``SPN_VBYTES`` in ``propagation_cpu.cpp``: 64 where the
    CPU has AVX-512, else 32), of ``lib`` or this process's library; None where there is none."""
    lib = lib if lib is not None else library()
    return None if lib is None else int(lib.spn_vector_bytes())


def supports(*tensors: Tensor | None) -> bool:
    """Whether the fused kernel takes these tensors: CPU, one dtype of float32 / float64."""
    present = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype == present[0].dtype for t in present) and present[0].dtype in _DTYPES


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _dims(h: Tensor, k: int) -> tuple[int, ...]:
    return (*h.shape, k, torch.get_num_threads())


def _forward(lib: ctypes.CDLL, h: Tensor, h0: Tensor, nw: Tensor, sw: Tensor | None, aw: Tensor | None,
             rs: Tensor | None, k: int, out: Tensor | None = None) -> Tensor:  # fmt: skip
    out = empty_like(h) if out is None else out
    fn = getattr(lib, f"spn_forward_{_DTYPES[h.dtype]}")
    fn(*(_ptr(t) for t in (h, h0, nw, rs, sw, aw, out)), *_dims(h, k), cache_bytes())
    return out


class FusedCPUStep(torch.autograd.Function):
    """One step through the fused CPU kernels; the backward computes only the gradients asked for.

    With ``ring_scale`` the neighbour weights are ``neighbour_weight * ring_scale[:, ring(j)]`` (DySPN's
    factored form, ``propagation.dyspn_factored_weights``), formed inside the kernels."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, h0: Tensor, neighbour_weight: Tensor, self_weight: Tensor | None,
                anchor_weight: Tensor | None, ring_scale: Tensor | None, kernel_size: int) -> Tensor:  # fmt: skip
        ctx.kernel_size = kernel_size
        ctx.save_for_backward(h, h0, neighbour_weight, self_weight, anchor_weight, ring_scale)
        return forward_step(h, h0, neighbour_weight, self_weight, anchor_weight, ring_scale, kernel_size)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        return one_step_backward(sys.modules[__name__], ctx.saved_tensors, ctx.needs_input_grad, grad_out,
                                 ctx.kernel_size)  # fmt: skip


def propagate_step_cpu(
    h: Tensor,
    h0: Tensor,
    neighbour_weight: Tensor,
    self_weight: Tensor | None,
    anchor_weight: Tensor | None,
    kernel_size: int,
    ring_scale: Tensor | None = None,
) -> Tensor | None:
    """One step through the fused kernels, or None where they do not apply (no library, dtype, device).

    Same arguments and shapes as ``propagate_step``, which checks them; tensors are made contiguous.
    """
    tensors = (h, h0, neighbour_weight, self_weight, anchor_weight, ring_scale)
    if not supports(*tensors):
        return None
    lib = library()
    if lib is None:
        return None
    c = [t.contiguous() if t is not None else None for t in tensors]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedCPUStep.apply(*c, kernel_size)
    return _forward(lib, *c, kernel_size)


def forward_step(h: Tensor, h0: Tensor, nw: Tensor, sw: Tensor | None, aw: Tensor | None, rs: Tensor | None,
                 kernel_size: int, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """One step's forward kernel on contiguous tensors (``fused_propagation``'s backend interface), into
    ``out`` where given (contiguous, ``h``'s shape)."""
    lib = library()
    assert lib is not None  # the callers checked
    return _forward(lib, h, h0, nw, sw, aw, rs, kernel_size, out)


# fused_propagation runs the T steps, forward and backward, one batch item (or group) at a time on these
# kernels (see its group_size and forward_steps).
item_major = True

_DEFAULT_CACHE_BYTES = 32 << 20  # where the CPU's caches cannot be read: the L3 of the EPYC VM it was measured on
_CACHE_BYTES: int | None = None  # the kernels' prefetch choice only (tests, benchmarks); None: this machine's


def last_level_cache_bytes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the first CPU's last-level cache (the L3 of its core complex on a server CPU), from Linux's
    sysfs: the highest ``level`` among ``root/index*``, its ``size`` (``32768K``); None where not readable."""
    best: tuple[int, int] | None = None
    for index in Path(root).glob("index*"):
        try:
            level = int((index / "level").read_text())
            raw = (index / "size").read_text().strip().upper()
            size = int(raw[:-1]) << {"K": 10, "M": 20, "G": 30}[raw[-1]] if raw[-1] in "KMG" else int(raw)
        except (OSError, ValueError, IndexError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


# At most this much last-level cache per CPU this process may run on. No CPU sold has more than 12 MB of L3 per
# core (Zen 4 X3D: 96 MB for 8), so a larger share means the cache is shared with CPUs this process cannot
# see: a VM's slice of a server's L3. Seen: a 2-vCPU VM on a Xeon with AMX whose sysfs reports the socket's
# 480 MB L3. Taken at face value, no step there spread its prefetches or streamed its stores, and item-major
# groups took the whole batch. At 32 MB instead (16 MB x 2 CPUs), the kernels' library built once, the two
# settings alternating in one process (best of 12): the backward alone at [4, 11, 192, 256] 2.89 / 6.81 /
# 8.08 -> 1.95 / 6.17 / 7.05 ms (CSPN 3x3 / 7x7, DySPN 7x7), the forward at [8, 21, 256, 256] 8.43 / 15.56 /
# 16.24 -> 5.30 / 14.02 / 14.96 ms; T=6 steps through propagate forward+backward at [8, 21, 256, 256] 148 /
# 299 / 375 -> 109 / 267 / 315 ms (at [4, 11, 192, 256] 25.9 / 75.7 / 86.1 -> 24.1 / 74.3 / 83.7 ms). On the
# EPYC VM where the kernels were tuned (32 MB L3, 2 CPUs) the cap changes nothing, unless the process is pinned
# to one of the two CPUs (taskset): 16 MB then.
_MAX_CACHE_PER_CPU = 16 << 20
# Item-major groups (group_bytes) count twice that share of such an L3. With 16 MB a CPU their budget there was
# 16 MB: at 192x256 and 11 classes one item's step moves 7.9 MB (CSPN 3x3), 15.4 MB (CSPN 7x7) or 16.1 MB
# (DySPN 7x7), so groups held 2, 1 and 1 items, and each group's T steps cost a kernel call per step, its rings
# filled anew and Python around each call; with 32 MB they hold 4, 2 and 1. T=6 steps through propagate forward
# / forward+backward, group budget 16 -> 32 MB, alternating in one process on the Xeon VM (best of 7), ms:
# - [8, 11, 192, 256] (configs/camvid.yaml's maps): CSPN 3x3 17.1 / 51.7 -> 13.2 / 47.6 (another run, 16 ->
#   64 MB: 16.5 / 54.6 -> 12.7 / 47.5), CSPN 7x7 49.5 / 147.0 -> 46.1 / 144.9, DySPN 7x7 (the same groups)
#   62.6 / 195.1 -> 62.5 / 194.3;
# - [4, 11, 192, 256] (the bench's maps; 3x3: the whole batch): CSPN 3x3 10.9 / 32.7 -> 8.6 / 29.4, CSPN 7x7
#   27.4 / 80.0 -> 23.6 / 79.0, DySPN 7x7 (the same groups) 35.4 / 111.0 -> 36.8 / 110.8;
# - [8, 11, 96, 128] (groups of 7 and 3 items -> the whole batch and 7): CSPN 3x3 4.2 / 16.4 -> 4.0 / 16.7,
#   CSPN 7x7 14.1 / 47.0 -> 12.3 / 42.6, DySPN 7x7 19.2 / 61.8 -> 16.6 / 57.8;
# - [8, 21, 256, 256] (one item a group either way: 19-30 MB an item): 36.6 / 117.4, 92.3 / 289.4 and 113.0 /
#   360.1 against 37.0 / 123.4, 90.6 / 288.6 and 112.7 / 363.8, this host's noise.
# Larger budgets (64 MB, the whole batch) made that shape's 7x7 steps 4-6 % slower (two items a group). On a CPU
# whose L3 is at most 16 MB a CPU (the EPYC VM) both caps leave its size.
_MAX_GROUP_CACHE_PER_CPU = 32 << 20


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@cache
def _machine_cache_bytes(per_cpu: int = _MAX_CACHE_PER_CPU) -> int:
    """The last-level cache's size, at most ``per_cpu`` per usable CPU; 32 MB where unknown."""
    size = last_level_cache_bytes() or _DEFAULT_CACHE_BYTES
    return min(size, per_cpu * usable_cpus())


def cache_bytes() -> int:
    """The cache size the kernels get (``_CACHE_BYTES`` where a test or benchmark fixes it, else the last-level
    cache's, read once, at most 16 MB per usable CPU (``_machine_cache_bytes``); 32 MB where it cannot be read).
    They prefetch the rows of a step that moves more than this spread over the row before, a smaller step's in
    bursts (``RowPrefetch`` in ``propagation_cpu.cpp``). Results do not depend on it."""
    return _CACHE_BYTES if _CACHE_BYTES is not None else _machine_cache_bytes()


def group_bytes() -> int:
    """The step traffic one group of batch items may take (``fused_propagation.group_size``): half of
    min(last-level cache, ``_MAX_GROUP_CACHE_PER_CPU`` x usable CPUs), so that a group's maps and weights stay
    in the cache from step to step (16 MB where the cache size is unknown). Measured with 16 MB on the 2-core
    EPYC VM (32 MB L3): ``forward_steps``; on the 2-vCPU Xeon VM the cap's comment. Not moved by
    ``_CACHE_BYTES`` (``fused_propagation._GROUP_BYTES`` fixes it)."""
    return _machine_cache_bytes(_MAX_GROUP_CACHE_PER_CPU) // 2


def backward_step(g: Tensor, h: Tensor, *tensors: Tensor | None, kernel_size: int, accumulate: bool) -> None:
    """One step's backward kernel (``fused_propagation``'s backend interface): ``tensors`` are ``h0, nw,
    rs, sw, aw`` then the gradient buffers ``grad_h, grad_h0, grad_nw, grad_rs, grad_sw, grad_aw`` (None:
    not computed). With ``accumulate`` the kernel adds into ``grad_h0`` and ``grad_nw`` instead of
    overwriting them."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, f"spn_backward_{_DTYPES[h.dtype]}")
    fn(*(_ptr(t) for t in (g, h, *tensors)), *_dims(h, kernel_size), int(accumulate), cache_bytes())


def propagate_cpu(
    h0: Tensor, neighbour_weight: Tensor, per_step: list[tuple[Tensor | None, Tensor | None, Tensor | None]],
    kernel_size: int,
) -> list[Tensor] | None:  # fmt: skip
    """``h^1 .. h^T`` through ``fused_propagation.run_steps`` on these kernels (one autograd node), or
    None where they do not apply (no library, dtype, device). ``per_step``: each step's
    ``(self_weight, anchor_weight, ring_scale)``; the caller (``propagation.propagate``) has checked the
    shapes."""
    if not supports(h0, neighbour_weight, *[t for step in per_step for t in step]) or library() is None:
        return None
    return run_steps(sys.modules[__name__], h0, neighbour_weight, per_step, kernel_size)


def takes(*tensors: Tensor | None) -> bool:
    """Whether the kernels run on these tensors: ``supports`` them, and the library is built (or builds now)."""
    return supports(*tensors) and library() is not None


def _entry(name: str, *tensors: Tensor | None) -> Any | None:
    """The library's ``spn_<name>_<dtype>`` for these tensors (dtype of the first), or None where the kernels
    do not apply (no library, dtype, device)."""
    if not takes(*tensors):
        return None
    return getattr(library(), f"spn_{name}_{_DTYPES[tensors[0].dtype]}")  # type: ignore[union-attr]


def cspn_normalise(affinity: Tensor, floor: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """CSPN's normalisation in one pass (``propagation._CSPNNormalise``): ``(kappa_hat, abs_sum, inv, total,
    a)`` with ``kappa_hat = a * inv``, ``inv = 1 / max(abs_sum, floor)``, ``abs_sum = sum_j |a_j|``, ``total =
    sum_j a_j`` (those three ``[B, 1, H, W]``) and ``a`` the affinity made contiguous (for the backward: a
    channels-last affinity is copied once), or None where the kernels do not apply (no library, dtype,
    device)."""
    fn = _entry("cspn_normalise", affinity)
    if fn is None:
        return None
    a = contiguous(affinity)
    b, k, h, w = a.shape
    kappa = empty_like(a)
    abs_sum, inv, total = (a.new_empty(b, 1, h, w) for _ in range(3))
    fn(*(_ptr(t) for t in (a, kappa, abs_sum, inv, total)), b, k, h * w, floor, torch.get_num_threads())
    return kappa, abs_sum, inv, total, a


def cspn_normalise_backward(affinity: Tensor, grad_kappa: Tensor | None, grad_centre: Tensor | None,
                            saved: tuple[Tensor, Tensor, Tensor], floor: float) -> Tensor | None:  # fmt: skip
    """The gradient of the affinity through ``cspn_normalise`` given those of ``kappa_hat`` and of the centre
    weight ``1 - inv * total`` (None: zero), ``saved`` = its ``(abs_sum, inv, total)``; or None where the
    kernels do not apply."""
    tensors = (affinity, grad_kappa, grad_centre, *saved)
    fn = _entry("cspn_normalise_backward", *tensors)
    if fn is None:
        return None
    b, k, h, w = affinity.shape
    one = (b, 1, h, w)
    _check_shapes(f"for an affinity of {list(affinity.shape)}", grad_kappa=(grad_kappa, affinity.shape),
                  grad_centre=(grad_centre, one), abs_sum=(saved[0], one), inv=(saved[1], one), total=(saved[2], one))  # fmt: skip
    a, gk, gc, abs_sum, inv, total = (t.contiguous() if t is not None else None for t in tensors)
    out = empty_like(a)  # type: ignore[arg-type]
    fn(*(_ptr(t) for t in (a, gk, gc, abs_sum, inv, total, out)), b, k, h * w, floor, torch.get_num_threads())
    return out


def ring_sums(affinity: Tensor, kernel_size: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """DySPN's ring sums in one pass (``propagation._RingSums``): per ring of the window the sum of the
    affinities and of their absolute values, two ``[B, R, H, W]``, and the affinity made contiguous (for
    the backward, as ``cspn_normalise``'s); or None where the kernels do not apply."""
    fn = _entry("ring_sums", affinity)
    if fn is None:
        return None
    b, _, h, w = affinity.shape
    _check_shapes(f"for kernel_size={kernel_size}", affinity=(affinity, (b, kernel_size * kernel_size - 1, h, w)))
    a = contiguous(affinity)
    sums = a.new_empty(b, kernel_size // 2, h, w)
    abs_sums = torch.empty_like(sums)
    fn(_ptr(a), _ptr(sums), _ptr(abs_sums), b, kernel_size, h * w, torch.get_num_threads())
    return sums, abs_sums, a


def _check_channel_slice(name: str, out: Tensor, shape: torch.Size) -> None:
    """Refuses an output the kernels cannot write item by item with a batch stride: not of ``shape``, or a batch
    item's channels not contiguous (a channel slice of a contiguous tensor passes)."""
    _, _, h, w = shape
    if out.shape != shape or out.stride()[1:] != (h * w, w, 1):
        raise ValueError(f"{name} must be {list(shape)} with each item's channels contiguous, "
                         f"got {list(out.shape)} strides {out.stride()}")  # fmt: skip


def _check_shapes(context: str, **expected: tuple[Tensor | None, tuple[int, ...]]) -> None:
    """Refuses (ValueError naming it) a tensor the kernels would read or write out of bounds: each ``name=(tensor,
    shape)`` not of its shape (None passes). The kernels take every size from one tensor (``context`` names it)."""
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must be {list(shape)} {context}, got {list(t.shape)}")


def _check_step_weight_shapes(attention: Tensor, ring_sum: Tensor, ring_abs_sum: Tensor,
                              grads: tuple[Tensor | None, ...] = ()) -> None:  # fmt: skip
    """The DySPN step-weight kernels' shapes: the ring sums one ``[B, R, H, W]``, the attention ``[B, R+1, H, W]``,
    the gradients of ``(self, anchor, ring_scale)`` ``[B, 1, H, W]``, ``[B, 1, H, W]``, ``[B, R, H, W]``."""
    b, r, h, w = ring_sum.shape
    shapes = ((b, 1, h, w), (b, 1, h, w), (b, r, h, w))
    gradients = dict(zip(("grad_self", "grad_anchor", "grad_ring_scale"), zip(grads, shapes)))
    _check_shapes(f"for ring sums of {list(ring_sum.shape)}", ring_abs_sum=(ring_abs_sum, (b, r, h, w)),
                  attention=(attention, (b, r + 1, h, w)), **gradients)  # fmt: skip


def ring_sums_backward(affinity: Tensor, grad_sum: Tensor | None, grad_abs_sum: Tensor | None, kernel_size: int,
                       addend: Tensor | None = None, out: Tensor | None = None) -> Tensor | None:  # fmt: skip
    """The affinity's gradient through ``ring_sums`` (``d a_j = grad_sum[ring(j)] + sign(a_j)
    grad_abs_sum[ring(j)]``, None: zero), plus ``addend`` where given (another ``[B, k*k-1, H, W]`` gradient
    of the affinity, added in the same pass), into ``out`` where given (``affinity``'s shape; each batch item's
    channels contiguous, as a channel slice of a contiguous tensor is) else a fresh tensor; or None where the
    kernels do not apply."""
    tensors = (affinity, grad_sum, grad_abs_sum, addend, out)
    fn = _entry("ring_sums_backward", *tensors)
    if fn is None:
        return None
    b, _, h, w = affinity.shape
    r = kernel_size // 2
    _check_shapes(f"for kernel_size={kernel_size} and an affinity of {list(affinity.shape)}",
                  affinity=(affinity, (b, kernel_size * kernel_size - 1, h, w)), grad_sum=(grad_sum, (b, r, h, w)),
                  grad_abs_sum=(grad_abs_sum, (b, r, h, w)), addend=(addend, affinity.shape))  # fmt: skip
    a, gs, ga, add = (t.contiguous() if t is not None else None for t in tensors[:4])
    if out is None:
        out = empty_like(a)  # type: ignore[arg-type]
    else:
        _check_channel_slice("out", out, a.shape)  # type: ignore[union-attr]
    fn(_ptr(a), _ptr(gs), _ptr(ga), _ptr(add), _ptr(out), b, kernel_size, h * w, out.stride(0), torch.get_num_threads())
    return out


def dyspn_step_weights(attention: Tensor, ring_sum: Tensor, ring_abs_sum: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor] | None:  # fmt: skip
    """One DySPN step's ``(self, anchor, ring_scale)`` from its attention ``[B, R+1, H, W]`` and the ring sums
    ``[B, R, H, W]`` in one pass (``propagation._DySPNStepWeights``), or None where the kernels do not apply."""
    tensors = (attention, ring_sum, ring_abs_sum)
    fn = _entry("dyspn_step_weights", *tensors)
    if fn is None:
        return None
    _check_step_weight_shapes(*tensors)
    att, rsum, rabs = (t.contiguous() for t in tensors)
    b, r, h, w = rsum.shape
    sw, aw = att.new_empty(b, 1, h, w), att.new_empty(b, 1, h, w)
    scale = att.new_empty(b, r, h, w)
    fn(*(_ptr(t) for t in (att, rsum, rabs, sw, aw, scale)), b, r, h * w, eps, torch.get_num_threads())
    return sw, aw, scale


def dyspn_step_weights_backward(attention: Tensor, ring_sum: Tensor, ring_abs_sum: Tensor,
                                grads: tuple[Tensor | None, Tensor | None, Tensor | None], needs: tuple[bool, bool, bool],
                                eps: float, logits_out: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:  # fmt: skip
    """The gradients of ``(attention, ring_sum, ring_abs_sum)`` (each None where ``needs`` says so) from those of
    ``(self, anchor, ring_scale)`` (None: zero), or None where the kernels do not apply. With ``logits_out``
    (``attention``'s shape, each batch item's channels contiguous, as a channel slice of a contiguous tensor is)
    the attention is a sigmoid's output and the gradient of its logits is written there instead (``d attention
    * (1 - attention) * attention``, as torch's ``sigmoid_backward``), and returned first."""
    fn = _entry("dyspn_step_weights_backward", attention, ring_sum, ring_abs_sum, *grads, logits_out)
    if fn is None:
        return None
    _check_step_weight_shapes(attention, ring_sum, ring_abs_sum, grads)
    att, rsum, rabs = (t.contiguous() for t in (attention, ring_sum, ring_abs_sum))
    gsw, gaw, gscale = (g.contiguous() if g is not None else None for g in grads)
    out = [torch.empty_like(t) if need else None for t, need in zip((att, rsum, rabs), needs, strict=True)]
    b, r, h, w = rsum.shape
    if logits_out is not None:
        _check_channel_slice("logits_out", logits_out, att.shape)
        out[0] = logits_out
    stride = out[0].stride(0) if out[0] is not None else (r + 1) * h * w
    fn(*(_ptr(t) for t in (att, rsum, rabs, gsw, gaw, gscale, out[0], out[1], out[2])), b, r, h * w, stride,
       int(logits_out is not None), eps, torch.get_num_threads())  # fmt: skip
    return out[0], out[1], out[2]


def stream_rows(inputs: list[Tensor], outputs: list[Tensor]) -> float | None:
    """The streaming floor of a step's traffic (``stream_rows`` in ``propagation_cpu.cpp``; ``make bench``'s
    yardstick): reads every row of ``inputs`` and writes every row of ``outputs`` (contiguous float32 ``[B, *,
    H, W]`` maps of one B, H, W) in the kernels' order, with their choice of non-temporal stores, and no
    arithmetic; returns the sum read, or None where the kernels do not apply."""
    if not takes(*inputs, *outputs) or any(t.dtype != torch.float32 or not t.is_contiguous() for t in inputs + outputs):
        return None
    b, _, h, w = inputs[0].shape
    if any(t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (b, h, w) for t in inputs + outputs):
        raise ValueError("stream_rows: every map must be [B, *, H, W] with one B, H and W")

    def arrays(ts: list[Tensor]) -> tuple[Any, Any]:
        return (ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts)), (ctypes.c_long * len(ts))(
            *(t.shape[1] for t in ts)
        )

    ins, in_ch = arrays(inputs)
    outs, out_ch = arrays(outputs)
    lib = library()
    assert lib is not None  # takes() built it
    return float(lib.spn_stream_rows_f32(ins, in_ch, len(inputs), outs, out_ch, len(outputs), b, h, w, cache_bytes(),
                                         torch.get_num_threads()))  # fmt: skip
