"""Spatial propagation as pure tensor functions (CSPN, DySPN).

Both refiners reduce to one linear step over a k x k neighbourhood::

    h^{t+1}_i = sum_j a_ij * h^t_{i+o_j}  +  b_i * h^t_i  +  c_i * h^0_i

with per-pixel weights shared by all C channels. ``cspn_weights`` and ``dyspn_weights``
turn raw affinities into ``(a, b, c)`` following the papers' equations (see DESIGN.md), and
``propagate_step`` applies one step.

The fast path accumulates one shifted slice of a padded ``h`` at a time (``addcmul_``), so it
never materialises the ``k*k`` copies of ``[B, C, H, W]`` that an ``unfold`` does; its backward
(a custom ``autograd.Function``) is built from the same in-place shifted passes.
``propagate_step_reference`` is the slow, obviously correct ``unfold`` version, kept for tests.

Image borders: ``h`` is padded by replication, so a neighbour outside the image reads the
nearest border pixel. Together with weights that sum to one this keeps a constant map constant.

Backends: on CUDA, when ``triton`` imports, ``propagate_step`` runs the fused Triton kernels of
``triton_propagation.py`` (imported lazily, on the first CUDA step); on the CPU (float32 / float64)
it runs the fused C++/OpenMP kernels of ``cpu_propagation.py`` (built with the system's compiler on
first use); otherwise, or where neither is available, the shifted-slice path.
``set_propagation_backend`` (or the environment variable ``SPNTUNE_PROPAGATION``, read at each call)
chooses: ``"auto"`` (default, as above), ``"torch"`` (always the shifted-slice path), ``"cpp"``
(the fused CPU kernels, an error where they cannot be built or the tensors are not CPU float32 /
float64) or ``"triton"`` (always Triton, an error if it does not import; on CPU tensors this needs
``TRITON_INTERPRET=1``, which is how the tests check the kernels). The function's setting wins
over the variable.
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from spntune.models import cpu_propagation
from spntune.models.memory import contiguous, empty_like

__all__ = [
    "AFFINITY_NORMS",
    "CENTRE_PLACEMENTS",
    "cspn_weights",
    "dyspn_attention_channels",
    "dyspn_factored_weights",
    "dyspn_guidance_weights",
    "dyspn_ring_sums",
    "dyspn_weights",
    "neighbour_offsets",
    "num_neighbours",
    "num_rings",
    "propagate",
    "propagate_step",
    "propagate_step_reference",
    "ring_index",
    "set_propagation_backend",
]

#: Where CSPN puts the centre weight ``1 - sum_j kappa_hat_j``: on ``h^0`` (official code,
#: "8sum") or on ``h^t`` (the variant that some re-implementations use).
CENTRE_PLACEMENTS = ("h0", "ht")

#: How CSPN normalises raw affinities: ``abs_sum`` is the paper's ``kappa / sum_j |kappa_j|``;
#: ``clamped`` divides by ``max(sum_j |kappa_j|, 1)`` (NLSPN-style), which keeps the step
#: stable but lets a small affinity mean "propagate a little".
AFFINITY_NORMS = ("abs_sum", "clamped")

_EPS = 1e-6

#: Values of ``set_propagation_backend`` and ``SPNTUNE_PROPAGATION``.
PROPAGATION_BACKENDS = ("auto", "torch", "cpp", "triton")
_backend: str | None = None  # set_propagation_backend's choice; None defers to the environment


def set_propagation_backend(backend: str | None) -> None:
    """Choose how ``propagate_step`` runs: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"``, or None to
    follow ``SPNTUNE_PROPAGATION`` (default ``"auto"``). See the module docstring."""
    global _backend
    if backend is not None and backend not in PROPAGATION_BACKENDS:
        raise ValueError(f"propagation backend must be one of {PROPAGATION_BACKENDS}, got {backend!r}")
    _backend = backend


def _chosen_backend() -> str:
    backend = _backend or os.environ.get("SPNTUNE_PROPAGATION", "auto") or "auto"
    if backend not in PROPAGATION_BACKENDS:
        raise ValueError(f"SPNTUNE_PROPAGATION must be one of {PROPAGATION_BACKENDS}, got {backend!r}")
    return backend


@cache
def _triton_module() -> ModuleType | None:
    """``triton_propagation``, imported on first use; None where triton is missing or broken."""
    try:
        from spntune.models import triton_propagation
    except Exception:  # ImportError, or a triton that fails on this platform at import
        return None
    return triton_propagation


def _use_triton(backend: str, h: Tensor) -> ModuleType | None:
    if backend not in ("auto", "triton") or (backend == "auto" and not h.is_cuda):
        return None
    module = _triton_module()
    if module is None and backend == "triton":
        raise RuntimeError("SPNTUNE_PROPAGATION=triton, but triton does not import here")
    return module


def _selects_cpu_kernels(backend: str, h: Tensor) -> bool:
    """Whether the backend setting sends a step on ``h``'s device to the fused CPU kernels."""
    return backend in ("auto", "cpp") and not h.is_cuda


def _fused_cpu_step(backend: str, tensors: tuple[Tensor | None, ...], kernel_size: int,
                    ring_scale: Tensor | None) -> Tensor | None:  # fmt: skip
    """The fused CPU kernels' step, or None where the backend or the tensors do not select them."""
    if not _selects_cpu_kernels(backend, tensors[0]):  # type: ignore[arg-type]
        if backend == "cpp":
            raise RuntimeError(
                "SPNTUNE_PROPAGATION=cpp runs CPU tensors only; this step is on " + str(tensors[0].device)
            )  # type: ignore[union-attr]
        return None
    out = cpu_propagation.propagate_step_cpu(*tensors, kernel_size, ring_scale)  # type: ignore[arg-type]
    if out is None and backend == "cpp":
        reason = "the kernel library could not be built (see the warning above)"
        if not cpu_propagation.supports(*tensors, ring_scale):
            reason = f"it takes CPU float32 / float64 tensors of one dtype, got {[str(t.dtype) for t in tensors if t is not None]}"
        raise RuntimeError(f"SPNTUNE_PROPAGATION=cpp, but {reason}")
    return out


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")


def num_neighbours(kernel_size: int) -> int:
    """Neighbours of a pixel in a ``k x k`` window, centre excluded: ``k*k - 1``."""
    _check_kernel(kernel_size)
    return kernel_size * kernel_size - 1


def num_rings(kernel_size: int) -> int:
    """Concentric rings of a ``k x k`` window: ``(k - 1) / 2`` (3 for DySPN's 7x7)."""
    _check_kernel(kernel_size)
    return (kernel_size - 1) // 2


@cache
def neighbour_offsets(kernel_size: int) -> tuple[tuple[int, int], ...]:
    """``(dy, dx)`` of every neighbour, row-major over the window, centre skipped.

    This order matches ``F.unfold``'s kernel positions with the centre removed, and the
    channel order of every affinity tensor in this module.
    """
    _check_kernel(kernel_size)
    r = kernel_size // 2
    return tuple((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0))


@cache
def ring_index(kernel_size: int) -> tuple[int, ...]:
    """Ring (0-based: ring 1 of the paper is 0) of each neighbour: ``max(|dy|, |dx|) - 1``."""
    return tuple(max(abs(dy), abs(dx)) - 1 for dy, dx in neighbour_offsets(kernel_size))


def _ring_membership(kernel_size: int, like: Tensor) -> Tensor:
    """One-hot ``[R, K]`` matrix: row r marks the neighbours on ring r."""
    rings = torch.tensor(ring_index(kernel_size), device=like.device)
    return F.one_hot(rings, num_rings(kernel_size)).T.to(like.dtype)


def _check_weights(h: Tensor, neighbour_weight: Tensor, kernel_size: int) -> None:
    if h.dim() != 4:
        raise ValueError(f"h must be [B, C, H, W], got shape {tuple(h.shape)}")
    b, _, height, width = h.shape
    expected = (b, num_neighbours(kernel_size), height, width)
    if tuple(neighbour_weight.shape) != expected:
        raise ValueError(
            f"neighbour_weight must be {expected} for kernel_size={kernel_size}, got {tuple(neighbour_weight.shape)}"
        )


def _windows(kernel_size: int, height: int, width: int) -> list[tuple[slice, slice]]:
    """Per neighbour, the ``[H, W]`` window of the ``r``-padded map holding ``h`` shifted by its offset."""
    r = kernel_size // 2
    return [
        (slice(r + dy, r + dy + height), slice(r + dx, r + dx + width)) for dy, dx in neighbour_offsets(kernel_size)
    ]


def _accumulate(
    h: Tensor,
    h0: Tensor,
    neighbour_weight: Tensor,
    self_weight: Tensor | None,
    anchor_weight: Tensor | None,
    kernel_size: int,
) -> Tensor:
    """Forward of one step without autograd: one padded copy of h, one in-place pass per neighbour."""
    r = kernel_size // 2
    padded = F.pad(h, (r, r, r, r), mode="replicate")  # [B, C, H+2r, W+2r], one copy
    out = h0 * anchor_weight if anchor_weight is not None else torch.zeros_like(h)
    if self_weight is not None:
        out.addcmul_(self_weight, h)
    for j, (rows, cols) in enumerate(_windows(kernel_size, *h.shape[-2:])):
        out.addcmul_(neighbour_weight[:, j : j + 1], padded[:, :, rows, cols])  # a view: no copy
    return out


class _PropagateStep(torch.autograd.Function):
    """One step with a hand-written backward built from the same shifted-slice passes.

    Autograd through the forward's in-place loop would give every neighbour's gradient as a
    full padded-size tensor (k*k - 1 allocations and adds per step); here the adjoint shifts
    accumulate into one padded buffer, and replicate padding is folded back once.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, h0: Tensor, neighbour_weight: Tensor, self_weight: Tensor | None,
                anchor_weight: Tensor | None, kernel_size: int) -> Tensor:  # fmt: skip
        ctx.kernel_size = kernel_size
        ctx.save_for_backward(h, h0, neighbour_weight, self_weight, anchor_weight)
        return _accumulate(h, h0, neighbour_weight, self_weight, anchor_weight, kernel_size)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h, h0, neighbour_weight, self_weight, anchor_weight = ctx.saved_tensors
        k = ctx.kernel_size
        r = k // 2
        height, width = h.shape[-2:]
        windows = _windows(k, height, width)
        need_h, need_h0, need_nw, need_sw, need_aw, _ = ctx.needs_input_grad
        grad_h = grad_h0 = grad_nw = grad_sw = grad_aw = None
        if need_nw:
            padded = F.pad(h, (r, r, r, r), mode="replicate")
            grad_nw = empty_like(neighbour_weight)
            if grad_out.device.type == "cpu":
                # grad_nw[:, j] = sum_c grad_out[:, c] * shifted h[:, c], accumulated channel by channel in
                # place: no [B, C, H, W] product per neighbour and no reduction pass over it (1.7 -> 0.7 ms
                # per neighbour on [4, 11, 192, 256], one thread). Not on GPUs: C launches per neighbour.
                for j, (rows, cols) in enumerate(windows):
                    slot, shifted = grad_nw[:, j], padded[:, :, rows, cols]
                    torch.mul(grad_out[:, 0], shifted[:, 0], out=slot)
                    for c in range(1, grad_out.shape[1]):
                        slot.addcmul_(grad_out[:, c], shifted[:, c])
            else:
                product = torch.empty_like(grad_out)  # one buffer for all neighbours: no allocation per j
                for j, (rows, cols) in enumerate(windows):
                    torch.mul(grad_out, padded[:, :, rows, cols], out=product)
                    torch.sum(product, dim=1, out=grad_nw[:, j])
        if need_h:
            grad_padded = grad_out.new_zeros(*h.shape[:2], height + 2 * r, width + 2 * r)
            for j, (rows, cols) in enumerate(windows):
                grad_padded[:, :, rows, cols].addcmul_(neighbour_weight[:, j : j + 1], grad_out)
            grad_h = torch.ops.aten.replication_pad2d_backward(grad_padded, h, [r, r, r, r])
            if self_weight is not None:
                grad_h.addcmul_(self_weight, grad_out)
        if need_h0 and anchor_weight is not None:
            grad_h0 = grad_out * anchor_weight
        if need_sw and self_weight is not None:
            grad_sw = (grad_out * h).sum(dim=1, keepdim=True)
        if need_aw and anchor_weight is not None:
            grad_aw = (grad_out * h0).sum(dim=1, keepdim=True)
        return grad_h, grad_h0, grad_nw, grad_sw, grad_aw, None


def propagate_step(
    h: Tensor,
    h0: Tensor,
    neighbour_weight: Tensor,
    self_weight: Tensor | None,
    anchor_weight: Tensor | None,
    kernel_size: int,
    ring_scale: Tensor | None = None,
) -> Tensor:
    """One propagation step: fused Triton kernels on CUDA, fused C++ kernels on the CPU, else shifted slices.

    The backend follows ``set_propagation_backend`` / ``SPNTUNE_PROPAGATION`` (module docstring).

    Args:
        h: current map ``h^t``.
        h0: initial (coarse) map ``h^0``.
        neighbour_weight: weight of each neighbour, channel order of ``neighbour_offsets``.
        self_weight: weight of ``h^t`` at the pixel itself, or None for zero.
        anchor_weight: weight of ``h^0`` at the pixel, or None for zero.
        kernel_size: odd window size k.
        ring_scale: None, or per-ring factors: the neighbour weights are then
            ``neighbour_weight[:, j] * ring_scale[:, ring_index(k)[j]]`` (DySPN's factored form, see
            ``dyspn_factored_weights``); the fused CPU and Triton kernels form the product in registers,
            the shifted-slice path materialises it.

    Shape:
        h, h0: ``[B, C, H, W]``; neighbour_weight: ``[B, k*k-1, H, W]``;
        self_weight, anchor_weight: ``[B, 1, H, W]``; ring_scale: ``[B, (k-1)/2, H, W]``.
        Returns ``[B, C, H, W]`` (on the fused CPU kernels from ``memory``'s buffer pool where it reaches
        32 MB: its storage cannot be resized).
    """
    _check_step(h, h0, neighbour_weight, self_weight, anchor_weight, kernel_size, ring_scale)
    backend = _chosen_backend()
    tensors = (h, h0, neighbour_weight, self_weight, anchor_weight)
    fused = _fused_cpu_step(backend, tensors, kernel_size, ring_scale)
    if fused is not None:
        return fused
    triton_module = _use_triton(backend, h)
    if triton_module is not None:  # the Triton kernels take the factored weights as they are, too
        return triton_module.propagate_step_triton(
            h, h0, neighbour_weight, self_weight, anchor_weight, kernel_size, ring_scale
        )
    if ring_scale is not None:  # the shifted-slice path takes the neighbour weights whole
        neighbour_weight = _scaled(neighbour_weight, ring_scale, kernel_size)
        tensors = (h, h0, neighbour_weight, self_weight, anchor_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _PropagateStep.apply(h, h0, neighbour_weight, self_weight, anchor_weight, kernel_size)
    return _accumulate(h, h0, neighbour_weight, self_weight, anchor_weight, kernel_size)


def _check_step(h: Tensor, h0: Tensor, neighbour_weight: Tensor, self_weight: Tensor | None,
                anchor_weight: Tensor | None, kernel_size: int, ring_scale: Tensor | None) -> None:  # fmt: skip
    """``propagate_step``'s shape checks (ValueError naming the argument and the expected shape)."""
    _check_weights(h, neighbour_weight, kernel_size)
    for name, w in (("self_weight", self_weight), ("anchor_weight", anchor_weight)):
        if w is not None and tuple(w.shape) != (h.shape[0], 1, *h.shape[-2:]):
            raise ValueError(f"{name} must be {(h.shape[0], 1, *h.shape[-2:])}, got {tuple(w.shape)}")
    if h0.shape != h.shape:
        raise ValueError(f"h0 {tuple(h0.shape)} and h {tuple(h.shape)} differ in shape")
    if ring_scale is not None:
        expected = (h.shape[0], num_rings(kernel_size), *h.shape[-2:])
        if tuple(ring_scale.shape) != expected:
            raise ValueError(
                f"ring_scale must be {expected} for kernel_size={kernel_size}, got {tuple(ring_scale.shape)}"
            )


def _scaled(neighbour_weight: Tensor, ring_scale: Tensor, kernel_size: int) -> Tensor:
    """``neighbour_weight * ring_scale`` expanded to the neighbours: ``[B, k*k-1, H, W]``."""
    rings = torch.tensor(ring_index(kernel_size), device=ring_scale.device)
    return neighbour_weight * ring_scale.index_select(1, rings)


def propagate_step_reference(
    h: Tensor,
    h0: Tensor,
    neighbour_weight: Tensor,
    self_weight: Tensor | None,
    anchor_weight: Tensor | None,
    kernel_size: int,
    ring_scale: Tensor | None = None,
) -> Tensor:
    """Slow reference for ``propagate_step``: unfold every neighbourhood, weight, sum.

    Materialises ``[B, C, k*k, H, W]``; for tests only. Same arguments and shapes as
    ``propagate_step``.
    """
    _check_weights(h, neighbour_weight, kernel_size)
    if ring_scale is not None:
        neighbour_weight = _scaled(neighbour_weight, ring_scale, kernel_size)
    b, c, height, width = h.shape
    k = kernel_size
    r = k // 2
    padded = F.pad(h, (r, r, r, r), mode="replicate")
    patches = F.unfold(padded, kernel_size=k).view(b, c, k * k, height, width)
    centre = (k * k) // 2
    neighbours = torch.cat([patches[:, :, :centre], patches[:, :, centre + 1 :]], dim=2)
    out = (neighbours * neighbour_weight.unsqueeze(1)).sum(dim=2)
    if self_weight is not None:
        out = out + self_weight * h
    if anchor_weight is not None:
        out = out + anchor_weight * h0
    return out


class _CSPNNormalise(torch.autograd.Function):
    """``(kappa_hat, centre)`` with ``kappa_hat = a / max(sum_j |a_j|, floor)`` and ``centre = 1 - sum_j
    kappa_hat_j``, as one node. Through autograd's ops (abs, sum, clamp, div, sum) the backward of these
    few lines allocated and passed over about ten ``[B, k*k-1, H, W]`` tensors; this one allocates only
    the gradient of that size (its channel sums go one channel at a time). With ``n = max(s, floor)``,
    ``s = sum_j |a_j|``, ``S = sum_j a_j``, ``P = sum_j G_j a_j`` (G, g: the gradients of kappa_hat and
    centre)::

        d a_i = (G_i - g) / n - sign(a_i) [s > floor] (P - g S) / n^2

    (``clamp_min`` passes the gradient where ``s > floor``, not at the tie; ``abs`` has gradient 0 at 0:
    as torch). The backward is not itself differentiable (``create_graph=True`` through it raises).

    Where the backend setting selects the fused CPU kernels (float32 / float64), forward and backward are
    one C++ pass each (``cpu_propagation.cspn_normalise``): per block of pixels the k*k-1 affinity rows are
    read from memory once, against three passes over the affinity (abs-sum, sum, multiply) and four over
    the gradient through torch's ops. [4, 48, 192, 256]: 7.8 -> 6.1 ms forward, 18.5 -> 12.9 ms forward
    plus backward (2-core EPYC VM, fresh output memory included)."""

    @staticmethod
    def forward(ctx: Any, affinity: Tensor, floor: float) -> tuple[Tensor, Tensor]:
        ctx.floor = floor
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zero map
        fused = cpu_propagation.cspn_normalise(affinity, floor) if _weights_on_cpu_kernels(affinity) else None
        if fused is not None:  # one pass over the affinity instead of three
            kappa_hat, abs_sum, inv, total, contiguous_affinity = fused
            ctx.fused = True
            ctx.save_for_backward(contiguous_affinity, abs_sum, inv, total)
            return kappa_hat, torch.addcmul(torch.ones_like(inv), inv, total, value=-1.0)
        abs_sum = _channel_sum(affinity, absolute=True)
        inv = abs_sum.clamp_min(floor).reciprocal_()
        total = affinity.sum(dim=1, keepdim=True)
        ctx.fused = False
        ctx.save_for_backward(affinity, inv, total, abs_sum > floor)
        # The dtype affinity * inv would have (under autocast inv can be float32 with a half affinity).
        kappa_hat = torch.mul(affinity, inv, out=empty_like(affinity, torch.promote_types(affinity.dtype, inv.dtype)))
        return kappa_hat, torch.addcmul(torch.ones_like(inv), inv, total, value=-1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kappa: Tensor | None, grad_centre: Tensor | None) -> tuple[Tensor | None, None]:
        if ctx.fused:
            affinity, abs_sum, inv, total = ctx.saved_tensors
            out = cpu_propagation.cspn_normalise_backward(affinity, grad_kappa, grad_centre, (abs_sum, inv, total),
                                                          ctx.floor)  # fmt: skip
            if out is not None:
                return out, None
            passes = abs_sum > ctx.floor  # gradients the kernels do not take: the formula below
        else:
            affinity, inv, total, passes = ctx.saved_tensors
        if grad_kappa is None:
            grad_kappa = torch.zeros_like(affinity)
        g = grad_centre if grad_centre is not None else torch.zeros_like(inv)
        p = _channel_sum(grad_kappa, affinity)
        q = (p - g * total) * inv * inv * passes  # [B, 1, H, W]
        out = torch.sign(affinity, out=empty_like(affinity))
        out.mul_(q.neg_()).addcmul_(grad_kappa, inv).sub_(g * inv)
        return out, None


def _weights_on_cpu_kernels(affinity: Tensor) -> bool:
    """Whether the backend setting sends the weights' own nodes (CSPN's normalisation, DySPN's ring sums) on
    ``affinity`` to the fused CPU kernels (which still decline tensors they do not take: other dtypes, no
    library)."""
    return _selects_cpu_kernels(_chosen_backend(), affinity)


def _kernels_form_weights(*tensors: Tensor) -> bool:
    """Whether the weights' own nodes on these tensors run on the fused CPU kernels: the backend sends them
    there (``_weights_on_cpu_kernels``) and the kernels take the tensors (``cpu_propagation.takes``)."""
    return _weights_on_cpu_kernels(tensors[0]) and cpu_propagation.takes(*tensors)


def _channel_sum(x: Tensor, y: Tensor | None = None, absolute: bool = False) -> Tensor:
    """``sum_j |x_j|`` (with ``absolute``) or ``sum_j x_j * y_j`` (with ``y``) over dim 1, keepdim, one channel
    at a time: ``x.abs().sum(1)`` or ``(x * y).sum(1)`` first makes a temporary the size of x, which at
    ``[4, 48, 192, 256]`` (37.7 MB, above glibc's mmap threshold) is fresh memory, paged in on every call;
    measured on a 2-core VM: 12.6 ms against 1.6 ms this way (torch.linalg.vector_norm over dim 1: 42 ms).
    Elsewhere (CUDA's caching allocator keeps memory) one reduction instead of a launch per channel."""
    assert (y is not None) != absolute, "one of y and absolute"
    if x.device.type != "cpu":
        return (x * y if y is not None else x.abs()).sum(dim=1, keepdim=True)
    out = torch.zeros_like(x[:, :1])
    tmp = torch.empty_like(out)
    for j in range(x.shape[1]):
        xj = x[:, j : j + 1]
        if y is not None:
            out.addcmul_(xj, y[:, j : j + 1])
        else:
            out += torch.abs(xj, out=tmp)
    return out


def cspn_weights(
    affinity: Tensor, centre: str = "h0", norm: str = "abs_sum"
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """CSPN (Cheng et al. 2018) step weights from raw affinities.

    ``kappa_hat = kappa / sum_j |kappa_j|`` and the centre weight is ``1 - sum_j kappa_hat_j``,
    placed on ``h^0`` (``centre="h0"``, the official "8sum" mode) or on ``h^t`` (``"ht"``).
    All-zero affinities give ``kappa_hat = 0`` and centre weight 1: the identity.

    Args:
        affinity: raw affinities ``kappa`` from the affinity network.
        centre: ``"h0"`` or ``"ht"``.
        norm: ``"abs_sum"`` (paper) or ``"clamped"`` (divide by ``max(sum |kappa|, 1)``).

    Shape:
        affinity: ``[B, k*k-1, H, W]``. Returns ``(neighbour [B, k*k-1, H, W],
        self [B, 1, H, W] | None, anchor [B, 1, H, W] | None)`` for ``propagate_step``.
    """
    if centre not in CENTRE_PLACEMENTS:
        raise ValueError(f"centre must be one of {CENTRE_PLACEMENTS}, got {centre!r}")
    if norm not in AFFINITY_NORMS:
        raise ValueError(f"norm must be one of {AFFINITY_NORMS}, got {norm!r}")
    kappa_hat, centre_weight = _CSPNNormalise.apply(affinity, _EPS if norm == "abs_sum" else 1.0)
    if centre == "h0":
        return kappa_hat, None, centre_weight
    return kappa_hat, centre_weight, None


def dyspn_weights(affinity: Tensor, attention: Tensor, kernel_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """DySPN (Lin et al. 2022) step weights for one iteration.

    With rings k = 1..R of the window, ``S_k = sum_{j in k} w_j``, ``|S|_k = sum_{j in k} |w_j|``
    and attention ``pi_1..pi_R`` (rings) and ``pi_{R+1}`` (``h^t`` itself)::

        S' = sum_k pi_k |S|_k + pi_{R+1} + eps
        h^{t+1} = [sum_k pi_k sum_{j in k} w_j h^t_j + pi_{R+1} h^t
                   + (S' - sum_k pi_k S_k - pi_{R+1}) h^0] / S'

    The weights sum to one at every pixel, so a constant map stays constant, and zero
    affinities give ``h^{t+1} = h^0`` when ``h^t = h^0``.

    Args:
        affinity: raw neighbour affinities ``w`` (shared by all iterations).
        attention: this iteration's attention maps, already in ``[0, 1]`` (sigmoid).
        kernel_size: odd window size k; R = (k - 1) / 2 rings.

    Shape:
        affinity: ``[B, k*k-1, H, W]``; attention: ``[B, R+1, H, W]``.
        Returns ``(neighbour [B, k*k-1, H, W], self [B, 1, H, W], anchor [B, 1, H, W])``.
    """
    affinity, self_weight, anchor, ring_scale = dyspn_factored_weights(affinity, attention, kernel_size)
    return _scaled(affinity, ring_scale, kernel_size), self_weight, anchor


class _RingSums(torch.autograd.Function):
    """``dyspn_ring_sums`` on the CPU, one neighbour at a time: no ``[B, k*k-1, H, W]`` temporaries (the
    einsums' ``affinity.abs()`` and, in their backward, products and copies of that size, each fresh
    memory above glibc's mmap threshold); the backward allocates the gradient only:
    ``d a_j = G_sum[ring(j)] + sign(a_j) G_abs[ring(j)]``. On the C++ backend forward and backward are
    one pass each over the affinity (``cpu_propagation.ring_sums``)."""

    @staticmethod
    def forward(ctx: Any, affinity: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
        ctx.kernel_size = kernel_size
        ctx.set_materialize_grads(False)
        fused = cpu_propagation.ring_sums(affinity, kernel_size) if _weights_on_cpu_kernels(affinity) else None
        ctx.fused = fused is not None
        if fused is not None:  # one pass over the affinity instead of one strided add per neighbour and sum
            ring_sum, ring_abs_sum, contiguous_affinity = fused
            ctx.save_for_backward(contiguous_affinity)
            return ring_sum, ring_abs_sum
        ctx.save_for_backward(affinity)
        rings = ring_index(kernel_size)
        b, _, h, w = affinity.shape
        ring_sum = affinity.new_zeros(b, num_rings(kernel_size), h, w)
        ring_abs_sum = torch.zeros_like(ring_sum)
        tmp = affinity.new_empty(b, h, w)
        for j, q in enumerate(rings):
            ring_sum[:, q] += affinity[:, j]
            ring_abs_sum[:, q] += torch.abs(affinity[:, j], out=tmp)
        return ring_sum, ring_abs_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_sum: Tensor | None, grad_abs_sum: Tensor | None) -> tuple[Tensor | None, None]:
        (affinity,) = ctx.saved_tensors
        if ctx.fused:
            fused = cpu_propagation.ring_sums_backward(affinity, grad_sum, grad_abs_sum, ctx.kernel_size)
            if fused is not None:
                return fused, None
        out = empty_like(affinity)
        if grad_abs_sum is not None:
            torch.sign(affinity, out=out)
        else:
            out.zero_()
        for j, q in enumerate(ring_index(ctx.kernel_size)):
            if grad_abs_sum is not None:
                out[:, j] *= grad_abs_sum[:, q]
            if grad_sum is not None:
                out[:, j] += grad_sum[:, q]
        return out, None


def dyspn_ring_sums(affinity: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    """``(S, |S|)``: per ring, the sum of the affinities and of their absolute values (``dyspn_weights``).

    They depend on the affinities only, which DySPN shares across its iterations: compute them once.

    Shape:
        affinity: ``[B, k*k-1, H, W]``. Returns two ``[B, R, H, W]``.
    """
    if affinity.dim() != 4 or affinity.shape[1] != num_neighbours(kernel_size):
        raise ValueError(
            f"affinity must be [B, {num_neighbours(kernel_size)}, H, W] for kernel_size={kernel_size}, "
            f"got {list(affinity.shape)}"
        )
    if affinity.device.type == "cpu":
        return _RingSums.apply(affinity, kernel_size)
    membership = _ring_membership(kernel_size, affinity)  # [R, K]
    ring_sum = torch.einsum("rk,bkhw->brhw", membership, affinity)
    ring_abs_sum = torch.einsum("rk,bkhw->brhw", membership, affinity.abs())
    return ring_sum, ring_abs_sum


class _DySPNStepWeights(torch.autograd.Function):
    """``dyspn_factored_weights``' maps on the C++ backend: ``(self, anchor, ring_scale)`` from one step's
    attention and the ring sums in one pass forward and one backward (``cpu_propagation.dyspn_step_weights``),
    where the torch ops take some twenty passes over ``[B, 1..R, H, W]`` maps (slices, products, sums and
    quotients, and their backward's zero-filled slice gradients), for each of DySPN's T steps."""

    @staticmethod
    def forward(ctx: Any, attention: Tensor, ring_sum: Tensor, ring_abs_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(attention, ring_sum, ring_abs_sum)
        out = cpu_propagation.dyspn_step_weights(attention, ring_sum, ring_abs_sum, _EPS)
        assert out is not None  # the caller checked that the kernels take these tensors
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_self: Tensor | None, grad_anchor: Tensor | None,
                 grad_scale: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
        attention, ring_sum, ring_abs_sum = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad)
        out = cpu_propagation.dyspn_step_weights_backward(attention, ring_sum, ring_abs_sum,
                                                          (grad_self, grad_anchor, grad_scale), needs, _EPS)  # fmt: skip
        assert out is not None
        return out


def dyspn_factored_weights(
    affinity: Tensor, attention: Tensor, kernel_size: int, ring_sums: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dyspn_weights`` without the ``[B, k*k-1, H, W]`` product: ``(affinity, self, anchor, ring_scale)``
    with ``ring_scale = pi_ring / S'``, for ``propagate_step(..., ring_scale=ring_scale)``.

    Per iteration only ``[B, R, H, W]``-sized maps are computed (R = 3 for 7x7, against 48 neighbours);
    the fused CPU kernels multiply affinity and scale in registers.

    Args:
        affinity: raw neighbour affinities ``w`` (shared by all iterations).
        attention: this iteration's attention maps in ``[0, 1]``.
        kernel_size: odd k.
        ring_sums: ``dyspn_ring_sums(affinity, kernel_size)``, computed once for all iterations (else here).

    Shape:
        affinity: ``[B, k*k-1, H, W]``; attention: ``[B, R+1, H, W]``. Returns ``(affinity,
        self [B, 1, H, W], anchor [B, 1, H, W], ring_scale [B, R, H, W])``.
    """
    n_rings = num_rings(kernel_size)
    if attention.shape[1] != n_rings + 1:
        raise ValueError(
            f"attention must have {n_rings + 1} channels for kernel_size={kernel_size}, got {attention.shape[1]}"
        )
    ring_sum, ring_abs_sum = ring_sums if ring_sums is not None else dyspn_ring_sums(affinity, kernel_size)
    shapes_agree = ring_sum.shape == ring_abs_sum.shape == (attention.shape[0], n_rings, *attention.shape[2:])
    if shapes_agree and _kernels_form_weights(affinity, attention, ring_sum, ring_abs_sum):
        self_weight, anchor, ring_scale = _DySPNStepWeights.apply(attention, ring_sum, ring_abs_sum)
        return affinity, self_weight, anchor, ring_scale
    pi_ring, pi_self = attention[:, :n_rings], attention[:, n_rings:]
    s_prime = (pi_ring * ring_abs_sum).sum(dim=1, keepdim=True) + pi_self + _EPS
    self_weight = pi_self / s_prime
    anchor = (s_prime - (pi_ring * ring_sum).sum(dim=1, keepdim=True) - pi_self) / s_prime
    return affinity, self_weight, anchor, pi_ring / s_prime


def dyspn_attention_channels(kernel_size: int, t: int) -> slice:
    """Step t's R+1 attention logits in DySPN's guidance ``[B, k*k-1 + (R+1)*T, H, W]``: after the k*k-1
    affinities, iteration-major (``DySPNRefiner``'s layout, read here and by its ``step_weight``)."""
    n, per = num_neighbours(kernel_size), num_rings(kernel_size) + 1
    return slice(n + per * t, n + per * (t + 1))


class _DySPNGuidanceWeights(torch.autograd.Function):
    """Every DySPN step's factored weights from the guidance tensor, as one autograd node on the C++ kernels
    (``dyspn_guidance_weights``): the affinity's contiguous copy, its ring sums, and per step the attention's
    sigmoid and ``cpu_propagation.dyspn_step_weights``. The backward writes the guidance's gradient into one
    buffer: the affinity's channels get the propagation's gradient plus the ring sums' (whose per-step
    gradients it sums itself), each step's attention channels its sigmoid's. Step by step, autograd joined a
    split's gradients with a ``cat``, added the affinity's two gradients and the ring sums' 2T, and ran 2T + 3
    nodes, each paying Python and dispatcher code on caches the kernel before it had evicted."""

    @staticmethod
    def forward(ctx: Any, guidance: Tensor, kernel_size: int, iterations: int) -> tuple[Tensor, ...]:
        ctx.kernel_size, ctx.shape = kernel_size, guidance.shape
        ctx.set_materialize_grads(False)
        affinity = contiguous(guidance[:, : num_neighbours(kernel_size)])
        sums = cpu_propagation.ring_sums(affinity, kernel_size)
        assert sums is not None  # dyspn_guidance_weights checked that the kernels take the guidance
        ring_sum, ring_abs_sum, _ = sums
        attention = [guidance[:, dyspn_attention_channels(kernel_size, t)].sigmoid() for t in range(iterations)]
        out: list[Tensor] = [affinity]
        for a in attention:
            step = cpu_propagation.dyspn_step_weights(a, ring_sum, ring_abs_sum, _EPS)
            assert step is not None
            out += step
        ctx.save_for_backward(affinity, ring_sum, ring_abs_sum, *attention)
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_affinity: Tensor | None, *grad_steps: Tensor | None
    ) -> tuple[Tensor | None, None, None]:
        affinity, ring_sum, ring_abs_sum, *attention = ctx.saved_tensors
        grad = affinity.new_empty(ctx.shape)
        grad_sum: Tensor | None = None
        grad_abs_sum: Tensor | None = None
        for t, a in enumerate(attention):
            target = grad[:, dyspn_attention_channels(ctx.kernel_size, t)]
            step_grads = grad_steps[3 * t : 3 * t + 3]
            if all(g is None for g in step_grads):  # nothing reached this step's weights
                target.zero_()
                continue
            # the attention logits' gradient (through the sigmoid) written straight into the guidance's gradient
            step = cpu_propagation.dyspn_step_weights_backward(a, ring_sum, ring_abs_sum, step_grads,  # type: ignore[arg-type]
                                                               (True, True, True), _EPS, logits_out=target)  # fmt: skip
            assert step is not None
            _, g_sum, g_abs = step
            grad_sum = g_sum if grad_sum is None else grad_sum.add_(g_sum)  # type: ignore[arg-type]
            grad_abs_sum = g_abs if grad_abs_sum is None else grad_abs_sum.add_(g_abs)  # type: ignore[arg-type]
        target = grad[:, : affinity.shape[1]]
        if grad_sum is not None:  # the ring sums' share plus the propagation's, written into the slice in one pass
            written = cpu_propagation.ring_sums_backward(affinity, grad_sum, grad_abs_sum, ctx.kernel_size,
                                                         addend=grad_affinity, out=target)  # fmt: skip
            assert written is not None
        elif grad_affinity is None:
            target.zero_()
        else:
            target.copy_(grad_affinity)
        return grad, None, None


def dyspn_guidance_weights(guidance: Tensor, kernel_size: int, iterations: int) -> list[tuple[Tensor, ...]] | None:
    """``DySPNRefiner.step_weights`` as one autograd node on the fused CPU kernels: every step's ``(affinity,
    self, anchor, ring_scale)`` (``dyspn_factored_weights`` of its sigmoid attention, one affinity tensor for
    all steps) from the guidance ``[B, k*k-1 + (R+1)*T, H, W]`` (affinities, then each step's R+1 attention
    logits); None where the CPU kernels do not run it (other backends, devices, dtypes, shapes), and the caller
    forms them op by op. Tested equal to that, values and gradients."""
    n, per = num_neighbours(kernel_size), num_rings(kernel_size) + 1
    if guidance.dim() != 4 or guidance.shape[1] != n + per * iterations or iterations < 1:
        return None
    if not _kernels_form_weights(guidance):
        return None
    affinity, *flat = _DySPNGuidanceWeights.apply(guidance, kernel_size, iterations)
    return [(affinity, *flat[3 * t : 3 * t + 3]) for t in range(iterations)]


def propagate(
    h0: Tensor,
    weights: list[tuple[Tensor | None, ...]],
    kernel_size: int,
    return_steps: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Run ``len(weights)`` steps from ``h0``; one ``(neighbour, self, anchor)`` per step, or
    ``(neighbour, self, anchor, ring_scale)`` (``dyspn_factored_weights``).

    Where every step has the same neighbour tensor (CSPN's one affinity map, DySPN's shared affinity)
    and fused kernels run the steps (C++ on the CPU, Triton on CUDA), all T steps are one autograd node
    (``fused_propagation.FusedPropagation``): the backward adds every step's neighbour-weight gradient
    into one buffer instead of allocating and summing T of them. Otherwise ``propagate_step`` per step.

    Shape:
        h0: ``[B, C, H, W]``. Returns ``(h^T, [h^0, h^1, ..., h^T])``; the list is empty
        unless ``return_steps``. As ``propagate_step``'s, maps of 32 MB and more from the fused CPU
        kernels come from ``memory``'s buffer pool (their storage cannot be resized).
    """
    fused = _fused_propagation(h0, weights, kernel_size)
    if fused is not None:
        return fused[-1], [h0, *fused] if return_steps else []
    h = h0
    steps = [h0] if return_steps else []
    for neighbour, self_weight, anchor, *scale in weights:
        h = propagate_step(h, h0, neighbour, self_weight, anchor, kernel_size, *scale)  # type: ignore[arg-type]
        if return_steps:
            steps.append(h)
    return h, steps


def _fused_propagation(h0: Tensor, weights: list[tuple[Tensor | None, ...]], kernel_size: int) -> list[Tensor] | None:  # fmt: skip
    """``h^1 .. h^T`` as one ``FusedPropagation`` node, or None where ``propagate`` steps one by one:
    the shifted-slice backend, no steps, neighbour weights that differ between steps, or tensors the
    kernels do not take."""
    if not weights:
        return None
    neighbour = weights[0][0]
    if neighbour is None or any(step[0] is not neighbour for step in weights):
        return None
    per_step = []
    for _, self_weight, anchor, *scale in weights:  # propagate_step's checks, in its order
        ring_scale = scale[0] if scale else None
        _check_step(h0, h0, neighbour, self_weight, anchor, kernel_size, ring_scale)
        per_step.append((self_weight, anchor, ring_scale))
    backend = _chosen_backend()
    triton_module = _use_triton(backend, h0)
    if triton_module is None and not _selects_cpu_kernels(backend, h0):
        return None
    if triton_module is not None:
        return triton_module.propagate_triton(h0, neighbour, per_step, kernel_size)
    return cpu_propagation.propagate_cpu(h0, neighbour, per_step, kernel_size)
