"""T propagation steps as one autograd node, on any fused step kernels (CPU C++ or Triton).

``propagation.propagate`` uses it where every step has the same neighbour tensor (CSPN's affinity map,
DySPN's shared affinity) and a fused backend runs the steps. Step by step, autograd would hand back one
``[B, k*k-1, H, W]`` gradient per step and add them up (T allocations and T - 1 additions of the
largest tensor of the step); here the backward kernels add every step's share into one buffer, and
likewise for ``h0``, which every step reads. Memory is what the step-by-step graph keeps: the maps
``h^0 .. h^{T-1}`` (never ``k*k`` times a map).

A backend is a module with two functions (``cpu_propagation``, ``triton_propagation``)::

    forward_step(h, h0, neighbour, self, anchor, ring_scale, kernel_size) -> h_next
    backward_step(g, h, h0, neighbour, ring_scale, self, anchor,
                  grad_h, grad_h0, grad_neighbour, grad_ring_scale, grad_self, grad_anchor,
                  kernel_size=..., accumulate=...) -> None

``backward_step`` writes the gradients whose buffers it is given (None: not wanted); with
``accumulate`` it adds into ``grad_h0`` and ``grad_neighbour`` instead of overwriting them. A backend
that sets ``item_major = True`` (the CPU one) takes ``forward_step(..., out=...)`` too, and its forward
and backward run the T steps a batch item (or a group) at a time (``group_size``, ``forward_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from spntune.models.memory import empty_like

__all__ = ["FusedPropagation", "forward_steps", "one_step_backward", "run_steps"]


class FusedPropagation(torch.autograd.Function):
    """``forward(ctx, kernels, kernel_size, h0, neighbour_weight, *per_step)`` with ``kernels`` the
    backend module and ``per_step`` the flattened ``(self_weight, anchor_weight, ring_scale)`` of each
    step (None where absent); returns ``h^1 .. h^T``. Gradients reaching any of them (a loss on
    intermediate steps) are taken in."""

    @staticmethod
    def forward(ctx: Any, kernels: ModuleType, kernel_size: int, h0: Tensor, neighbour_weight: Tensor,
                *per_step: Tensor | None) -> tuple[Tensor, ...]:  # fmt: skip
        ctx.kernels, ctx.kernel_size = kernels, kernel_size
        ctx.set_materialize_grads(False)  # an unused step's gradient stays None, not a zero map
        hs = forward_steps(kernels, h0, neighbour_weight, per_step, kernel_size)
        ctx.save_for_backward(h0, neighbour_weight, *hs[1:-1], *per_step)
        ctx.steps = len(hs) - 1
        return tuple(hs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_steps: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        n = ctx.steps
        h0, nw = saved[0], saved[1]
        hs = [h0, *saved[2 : 2 + n - 1]]  # the input of each step
        per_step = saved[2 + n - 1 :]
        _, _, need_h0, need_nw, *need_step = ctx.needs_input_grad
        # Which steps run and with what, the same for every batch item: a step runs once a gradient has
        # reached its output; the kernels add into grad_nw and grad_h0 from the second step they run on
        # (grad_nw, where wanted, is passed at every step); a grad_h0 first needed after that starts at zero.
        plan: list[tuple[int, bool, bool]] = []  # (step, accumulate, with grad_h0) in backward order
        reached = nw_written = h0_written = False
        h0_zeroed: bool | None = None  # grad_h0's buffer: None none, else whether it starts at zero
        for t in reversed(range(n)):
            reached = reached or grad_steps[t] is not None
            if not reached:  # nothing depends on this step's output
                continue
            with_h0 = need_h0 and per_step[3 * t + 1] is not None
            accumulate = nw_written or h0_written
            if with_h0 and h0_zeroed is None:
                h0_zeroed = accumulate
            plan.append((t, accumulate, with_h0))
            nw_written = nw_written or need_nw
            h0_written = h0_written or with_h0
        grad_nw = empty_like(nw) if need_nw and plan else None
        grad_h0 = None if h0_zeroed is None else empty_like(h0).zero_() if h0_zeroed else empty_like(h0)
        grads_step: list[Tensor | None] = [None] * len(per_step)
        for t, _, _ in plan:
            for i in range(3):
                if need_step[3 * t + i] and per_step[3 * t + i] is not None:
                    grads_step[3 * t + i] = empty_like(per_step[3 * t + i])  # type: ignore[arg-type]
        reaching_h0 = need_h0 and bool(plan) and plan[-1][0] == 0  # a gradient flows on from step 1 to h^0 = h0
        if reaching_h0 and grad_h0 is None:
            grad_h0 = empty_like(h0)
        # One batch item (or group) at a time where the backend asks for it (forward_steps says why), else
        # the whole batch as one group; grad_h of a group's steps lives in group-sized buffers. T=6 backward
        # kernels at [8, 11, 192, 256], alternating in one process on the EPYC VM, batch-major -> item-major:
        # CSPN 3x3 41.4 -> 29.0 ms, CSPN 7x7 110.1 -> 90.6, DySPN 7x7 129.4 -> 110.3.
        size = group_size(ctx.kernels, h0, nw, per_step[:3])
        for i in range(0, h0.shape[0] if plan else 0, size):
            part = slice(i, i + size)

            def cut(x: Tensor | None) -> Tensor | None:
                return None if x is None else x[part]  # noqa: B023 (used inside this iteration only)

            g: Tensor | None = None  # gradient of the current step's output
            for t, accumulate, with_h0 in plan:
                if grad_steps[t] is not None:
                    gt = grad_steps[t][part]  # type: ignore[index]
                    g = (gt if g is None else g + gt).contiguous()
                sw, aw, rs = per_step[3 * t : 3 * t + 3]
                grad_h = empty_like(g) if t > 0 or need_h0 else None  # type: ignore[arg-type]
                gsw, gaw, grs = grads_step[3 * t : 3 * t + 3]
                ctx.kernels.backward_step(g, hs[t][part], h0[part], nw[part], cut(rs), cut(sw), cut(aw), grad_h,
                                          cut(grad_h0) if with_h0 else None, cut(grad_nw), cut(grs), cut(gsw),
                                          cut(gaw), kernel_size=ctx.kernel_size, accumulate=accumulate)  # fmt: skip
                g = grad_h
            if reaching_h0:  # h^0 is h0 itself: the gradient reaching it joins the anchor terms'
                target = grad_h0[part]  # type: ignore[index]
                if h0_zeroed is None:
                    target.copy_(g)  # type: ignore[arg-type]
                else:
                    target.add_(g)  # type: ignore[arg-type]
        return (None, None, grad_h0, grad_nw, *grads_step)


def run_steps(kernels: ModuleType, h0: Tensor, neighbour_weight: Tensor,
              per_step: list[tuple[Tensor | None, Tensor | None, Tensor | None]], kernel_size: int) -> list[Tensor]:  # fmt: skip
    """``h^1 .. h^T`` on ``kernels``: one ``FusedPropagation`` node where autograd needs one, else the
    plain forward steps. ``per_step``: each step's ``(self_weight, anchor_weight, ring_scale)``; the
    caller has checked shapes and that ``kernels`` takes these tensors. Tensors are made contiguous."""
    flat = [t for step in per_step for t in step]
    c = [t.contiguous() if t is not None else None for t in (h0, neighbour_weight, *flat)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in c):
        return list(FusedPropagation.apply(kernels, kernel_size, *c))
    return forward_steps(kernels, c[0], c[1], c[2:], kernel_size)[1:]


_GROUP_BYTES: int | None = None  # a fixed budget (tests); None: the backend's group_bytes()


def group_size(kernels: ModuleType, h0: Tensor, neighbour_weight: Tensor, step: Sequence[Tensor | None]) -> int:
    """Batch items the steps run on at a time: the whole batch, or where the backend says ``item_major``
    as many as keep one step's traffic (h, h0, the output and ``step``'s weight maps) under its
    ``group_bytes()`` (the CPU kernels: half the last-level cache), at least one (small maps go several
    at a time: fewer kernel calls)."""
    if not getattr(kernels, "item_major", False):
        return h0.shape[0]
    per_item = sum(t[0].numel() * t.element_size() for t in (h0, h0, h0, neighbour_weight, *step) if t is not None)
    budget = _GROUP_BYTES if _GROUP_BYTES is not None else kernels.group_bytes()
    return max(1, budget // per_item)


def forward_steps(kernels: ModuleType, h0: Tensor, neighbour_weight: Tensor, per_step: Sequence[Tensor | None],
                  kernel_size: int) -> list[Tensor]:  # fmt: skip
    """``[h^0, h^1, .., h^T]`` on ``kernels`` (contiguous tensors; ``per_step`` flattened as in
    ``FusedPropagation``). Where the backend says ``item_major`` (the CPU kernels) the T steps run one
    batch item (or a group of small ones, ``group_size``) at a time into preallocated maps: one item's
    maps and weights (2.2 MB per 11-class map at 192x256, 9.4 MB of 7x7 weights) stay in the CPU's L3 from
    step to step, where the whole batch's do not.
    T=6 ``propagate`` forward with the weights, 2-core EPYC VM (32 MB L3), alternating in one process,
    batch-major -> item-major: at [8, 11, 192, 256] CSPN 3x3 17.3 -> 14.1 ms, CSPN 7x7 52.3 -> 38.5, DySPN
    7x7 61.4 -> 42.1; at [4, 11, 192, 256] 7.6 -> 7.4, 26.8 -> 21.0, 31.8 -> 23.9; at [8, 11, 96, 128] (one
    group of 7 items and one of 1) no change beyond noise."""
    steps = [per_step[i : i + 3] for i in range(0, len(per_step), 3)]
    n = group_size(kernels, h0, neighbour_weight, steps[0])
    if n >= h0.shape[0]:
        hs = [h0]
        for sw, aw, rs in steps:
            hs.append(kernels.forward_step(hs[-1], h0, neighbour_weight, sw, aw, rs, kernel_size))
        return hs
    outs = [empty_like(h0) for _ in steps]
    for i in range(0, h0.shape[0], n):
        group = [t[i : i + n] if t is not None else None for t in (h0, neighbour_weight, *per_step)]
        h = group[0]
        for s, out in enumerate(outs):
            sw, aw, rs = group[2 + 3 * s : 5 + 3 * s]
            h = kernels.forward_step(h, group[0], group[1], sw, aw, rs, kernel_size, out=out[i : i + n])
    return [h0, *outs]


def one_step_backward(kernels: ModuleType, saved: tuple[Tensor | None, ...], needs_input_grad: tuple[bool, ...],
                      grad_out: Tensor, kernel_size: int) -> tuple[Tensor | None, ...]:  # fmt: skip
    """The backward of one step (``FusedCPUStep``, ``TritonPropagateStep``): fresh buffers for the
    gradients asked for, filled by ``kernels.backward_step``. ``saved``: ``(h, h0, neighbour, self,
    anchor, ring_scale)``; returns their gradients and None for ``kernel_size``."""
    h, h0, nw, sw, aw, rs = saved
    need_h, need_h0, need_nw, need_sw, need_aw, need_rs, _ = needs_input_grad
    grad_h = empty_like(h) if need_h else None  # type: ignore[arg-type]
    grad_h0 = empty_like(h0) if need_h0 and aw is not None else None  # type: ignore[arg-type]
    grad_nw = empty_like(nw) if need_nw else None  # type: ignore[arg-type]
    grad_sw = torch.empty_like(sw) if need_sw and sw is not None else None
    grad_aw = torch.empty_like(aw) if need_aw and aw is not None else None
    grad_rs = torch.empty_like(rs) if need_rs and rs is not None else None
    kernels.backward_step(grad_out.contiguous(), h, h0, nw, rs, sw, aw, grad_h, grad_h0, grad_nw, grad_rs, grad_sw,
                          grad_aw, kernel_size=kernel_size, accumulate=False)  # fmt: skip
    return grad_h, grad_h0, grad_nw, grad_sw, grad_aw, grad_rs, None
