"""Fused Triton kernels for one propagation step (forward and backward).

``propagation.propagate_step`` dispatches here on CUDA when ``triton`` imports; this module is
imported lazily, so ``spntune`` never imports triton unless a step actually runs on the GPU
(or the Triton path is forced, see ``propagation.set_propagation_backend``).

One step is ``out = sum_j a_j * shift_j(h) + b * h + c * h0`` with replicate padding (a
neighbour outside the image reads the nearest border pixel), weights ``[B, *, H, W]`` shared by
all C channels. Every kernel works on a ``BLOCK_H x BLOCK_W`` pixel tile and a block of channels:

- ``_forward_kernel``: per channel block, the accumulator stays in registers while the k*k-1
  shifted reads of the tile and its halo (clamped indices) hit L1/L2, so HBM sees h, h0 and the
  weights once and the output is written once.
- ``_grad_weights_kernel``: ``d a_j = sum_c g * shift_j(h)`` (and ``d b``, ``d c``), reduced over
  channels in registers and written once per weight map; for DySPN's factored weights also the ring
  scales' gradients, each ring's sum kept in registers and written once.
- ``_grad_h_kernel``: the adjoint of the clamped gather is a gather over the padded domain:
  position P of the padded map receives ``sum_j a_j(P - o_j) g(P - o_j)`` from in-image sources;
  interior pixels are stored, while the padding frame and the border pixels it folds onto (the
  adjoint of replicate padding) are accumulated with ``atomic_add`` into a border zeroed first.
  Border sums are therefore order-nondeterministic at the last bit; the interior is exact.

Accumulation is in float32 (float64 for float64 inputs), so the kernels can be checked in float64
under ``TRITON_INTERPRET=1`` on a CPU (see ``tests/test_triton_propagation.py``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from spntune.models.fused_propagation import one_step_backward, run_steps

__all__ = [
    "TritonPropagateStep",
    "backward_step",
    "compiled_resources",
    "forward_step",
    "propagate_step_triton",
    "propagate_triton",
]

# 8 x 32 pixels: rows of 32 floats keep the loads coalesced.
#
# Register budget. Compiled for sm_90 (``tests/test_triton_propagation.py`` compiles every kernel ahead of
# time, no GPU needed, and reads ptxas' register and stack use), the first version of these kernels unrolled
# the k*k-1 neighbours (``tl.static_range``) inside a loop over channel blocks of up to 16: the scheduler hoisted
# every neighbour's loads, and the forward and grad_h kernels took 255 registers and spilled 0.5-0.9 KB per
# thread at k = 3, 7-14 KB of local memory at k = 7 (which also took 14-68 s to compile). Now the neighbours
# are a loop and a program takes one block of at most 8 channels (the channel blocks of a tile are neighbours
# in the grid): 48-102 registers and no spills at k = 3 and 7, sm_80 and sm_90, maps of any size (the
# tt.divisibility hints a launch on sizes that are multiples of 16 gets move them within that range), each
# kernel compiled in about a second.
_BLOCK_H = 8
_BLOCK_W = 32
_MAX_BLOCK_C = 8
_NUM_WARPS = 4


@triton.jit
def _tile_pixels(pid_tile, tiles_w, SHIFT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column of every pixel of a program's ``BLOCK_H x BLOCK_W`` tile, minus ``SHIFT``."""
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    y = (pid_tile // tiles_w) * BLOCK_H + offs // BLOCK_W - SHIFT
    x = (pid_tile % tiles_w) * BLOCK_W + offs % BLOCK_W - SHIFT
    return y, x


@triton.jit
def _tile_and_channels(pid, cblocks, BLOCK_C: tl.constexpr):
    """A program's tile and first channel: the channel blocks of one tile are neighbours in launch order,
    so the weight maps they share come from L2 for all but the first."""
    return pid // cblocks, (pid % cblocks) * BLOCK_C


@triton.jit
def _channel_block(c0, C, hw, BLOCK_C: tl.constexpr):
    """Offsets of channels ``[c0, c0 + BLOCK_C)`` in a ``[C, H, W]`` map (``hw = H * W``) and which of them
    exist, both ``[BLOCK_C, 1]``. The offsets are int64: ``C * H * W`` passes 2**31 at C = 150, 3800 x 3800."""
    chans = c0 + tl.arange(0, BLOCK_C)[:, None]
    return chans.to(tl.int64) * hw, chans < C


@triton.jit
def _neighbour_offset(j, K: tl.constexpr):
    """``(dy, dx)`` of neighbour ``j`` of a ``K x K`` window, row-major with the centre skipped (the channel order
    of the neighbour weights, ``propagation.neighbour_offsets``)."""
    jj = j + (j >= (K * K) // 2)
    return jj // K - K // 2, jj % K - K // 2


@triton.jit
def _forward_kernel(
    h_ptr, h0_ptr, nw_ptr, sw_ptr, aw_ptr, rs_ptr, ring_ptr, out_ptr,
    C, H, W, tiles_w, cblocks,
    K: tl.constexpr, HAS_SELF: tl.constexpr, HAS_ANCHOR: tl.constexpr, HAS_RING: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    R: tl.constexpr = K // 2
    pid_tile, c0 = _tile_and_channels(tl.program_id(0), cblocks, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    y, x = _tile_pixels(pid_tile, tiles_w, 0, BLOCK_H, BLOCK_W)
    inside = (y < H) & (x < W)
    pix = y * W + x
    map_base = b * hw  # one [H, W] map of a [B, 1, H, W] weight
    nw_base = nw_ptr + b * (K * K - 1) * hw
    rs_base = rs_ptr + b * R * hw
    h_base = h_ptr + b * C * hw
    chan_off, cmask = _channel_block(c0, C, hw, BLOCK_C)
    mask = cmask & inside[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_H * BLOCK_W], dtype=ACC)
    if HAS_ANCHOR:
        a = tl.load(aw_ptr + map_base + pix, mask=inside, other=0.0).to(ACC)
        acc += a[None, :] * tl.load(h0_ptr + b * C * hw + chan_off + pix[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_SELF:
        s = tl.load(sw_ptr + map_base + pix, mask=inside, other=0.0).to(ACC)
        acc += s[None, :] * tl.load(h_base + chan_off + pix[None, :], mask=mask, other=0.0).to(ACC)
    for j in range(K * K - 1):  # a loop, not static_range (register budget above)
        dy, dx = _neighbour_offset(j, K)
        yy = tl.minimum(tl.maximum(y + dy, 0), H - 1)
        xx = tl.minimum(tl.maximum(x + dx, 0), W - 1)
        wj = tl.load(nw_base + j * hw + pix, mask=inside, other=0.0).to(ACC)
        if HAS_RING:  # factored DySPN weight: the affinity times its ring's scale
            wj *= tl.load(rs_base + tl.load(ring_ptr + j) * hw + pix, mask=inside, other=0.0).to(ACC)
        hv = tl.load(h_base + chan_off + (yy * W + xx)[None, :], mask=mask, other=0.0).to(ACC)
        acc += wj[None, :] * hv
    tl.store(out_ptr + b * C * hw + chan_off + pix[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_or_add(ptrs, value, mask, ACCUMULATE: tl.constexpr, ACC: tl.constexpr):
    """Store ``value``, or add it to what is there (``ACCUMULATE``: the steps of one propagation share the
    buffer; every element has one writer per launch, and launches run in order)."""
    if ACCUMULATE:
        value += tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _dot_channels(g_base, h_base, pix, src, inside, C, hw, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """``sum_c g[c, pix] * h[c, src]`` over all channels, one value per pixel of the tile."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        chan_off, cmask = _channel_block(c0, C, hw, BLOCK_C)
        mask = cmask & inside[None, :]
        g = tl.load(g_base + chan_off + pix[None, :], mask=mask, other=0.0).to(ACC)
        hv = tl.load(h_base + chan_off + src[None, :], mask=mask, other=0.0).to(ACC)
        acc += tl.sum(g * hv, axis=0)
    return acc


@triton.jit
def _grad_weights_kernel(
    g_ptr, h_ptr, h0_ptr, nw_ptr, rs_ptr, gnw_ptr, grs_ptr, gsw_ptr, gaw_ptr,
    C, H, W, tiles_w,
    K: tl.constexpr, NEED_NW: tl.constexpr, NEED_RS: tl.constexpr, HAS_RING: tl.constexpr,
    NEED_SELF: tl.constexpr, NEED_ANCHOR: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    R: tl.constexpr = K // 2
    BLOCK: tl.constexpr = BLOCK_H * BLOCK_W
    pid_tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    y, x = _tile_pixels(pid_tile, tiles_w, 0, BLOCK_H, BLOCK_W)
    inside = (y < H) & (x < W)
    pix = y * W + x
    map_base = b * hw
    g_base = g_ptr + b * C * hw
    h_base = h_ptr + b * C * hw
    h0_base = h0_ptr + b * C * hw
    gnw_base = gnw_ptr + b * (K * K - 1) * hw
    if HAS_RING:
        # Factored weights a_j * s_ring(j): d = sum_c g * shift_j(h) is the effective weight's gradient;
        # d a_j = d * s_q and d s_q = sum_{j on ring q} d * a_j. Ring by ring (each ring's neighbours picked
        # out of the k*k-1 by a scalar test), so each ring's sum stays in registers and is stored once.
        nw_base = nw_ptr + b * (K * K - 1) * hw
        rs_base = rs_ptr + b * R * hw
        grs_base = grs_ptr + b * R * hw
        for q in range(R):
            scale = tl.load(rs_base + q * hw + pix, mask=inside, other=0.0).to(ACC)
            ring_acc = tl.zeros([BLOCK], dtype=ACC)
            for j in range(K * K - 1):  # loops, not static_range (register budget above)
                dy, dx = _neighbour_offset(j, K)
                if tl.maximum(tl.abs(dy), tl.abs(dx)) == q + 1:  # neighbour j lies on ring q
                    yy = tl.minimum(tl.maximum(y + dy, 0), H - 1)
                    xx = tl.minimum(tl.maximum(x + dx, 0), W - 1)
                    d = _dot_channels(g_base, h_base, pix, yy * W + xx, inside, C, hw, ACC, BLOCK_C, BLOCK)
                    if NEED_NW:
                        _store_or_add(gnw_base + j * hw + pix, d * scale, inside, ACCUMULATE, ACC)
                    if NEED_RS:
                        ring_acc += d * tl.load(nw_base + j * hw + pix, mask=inside, other=0.0).to(ACC)
            if NEED_RS:
                tl.store(grs_base + q * hw + pix, ring_acc.to(grs_ptr.dtype.element_ty), mask=inside)
    elif NEED_NW:
        for j in range(K * K - 1):
            dy, dx = _neighbour_offset(j, K)
            yy = tl.minimum(tl.maximum(y + dy, 0), H - 1)
            xx = tl.minimum(tl.maximum(x + dx, 0), W - 1)
            d = _dot_channels(g_base, h_base, pix, yy * W + xx, inside, C, hw, ACC, BLOCK_C, BLOCK)
            _store_or_add(gnw_base + j * hw + pix, d, inside, ACCUMULATE, ACC)
    if NEED_SELF or NEED_ANCHOR:
        acc_s = tl.zeros([BLOCK_H * BLOCK_W], dtype=ACC)
        acc_a = tl.zeros([BLOCK_H * BLOCK_W], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            chan_off, cmask = _channel_block(c0, C, hw, BLOCK_C)
            mask = cmask & inside[None, :]
            g = tl.load(g_base + chan_off + pix[None, :], mask=mask, other=0.0).to(ACC)
            if NEED_SELF:
                hv = tl.load(h_base + chan_off + pix[None, :], mask=mask, other=0.0).to(ACC)
                acc_s += tl.sum(g * hv, axis=0)
            if NEED_ANCHOR:
                h0v = tl.load(h0_base + chan_off + pix[None, :], mask=mask, other=0.0).to(ACC)
                acc_a += tl.sum(g * h0v, axis=0)
        if NEED_SELF:
            tl.store(gsw_ptr + map_base + pix, acc_s.to(gsw_ptr.dtype.element_ty), mask=inside)
        if NEED_ANCHOR:
            tl.store(gaw_ptr + map_base + pix, acc_a.to(gaw_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_h_kernel(
    g_ptr, nw_ptr, sw_ptr, aw_ptr, rs_ptr, ring_ptr, gh_ptr, gh0_ptr,
    C, H, W, tiles_w, cblocks,
    K: tl.constexpr, HAS_SELF: tl.constexpr, HAS_RING: tl.constexpr, NEED_H: tl.constexpr, NEED_H0: tl.constexpr,
    ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    # Tiles cover the padded domain [-R, H+R) x [-R, W+R); (y, x) are image coordinates.
    R: tl.constexpr = K // 2
    pid_tile, c0 = _tile_and_channels(tl.program_id(0), cblocks, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    y, x = _tile_pixels(pid_tile, tiles_w, R, BLOCK_H, BLOCK_W)
    in_padded = (y < H + R) & (x < W + R)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    interior = (y > 0) & (y < H - 1) & (x > 0) & (x < W - 1)  # pixels no padding folds onto
    yc = tl.minimum(tl.maximum(y, 0), H - 1)
    xc = tl.minimum(tl.maximum(x, 0), W - 1)
    target = yc * W + xc  # where replicate padding folds position (y, x) back to
    map_base = b * hw
    nw_base = nw_ptr + b * (K * K - 1) * hw
    rs_base = rs_ptr + b * R * hw
    g_base = g_ptr + b * C * hw
    chan_off, cmask = _channel_block(c0, C, hw, BLOCK_C)
    own = cmask & inside[None, :]
    g_own = tl.load(g_base + chan_off + target[None, :], mask=own, other=0.0).to(ACC)
    if NEED_H0:
        a = tl.load(aw_ptr + map_base + target, mask=inside, other=0.0).to(ACC)
        _store_or_add(gh0_ptr + b * C * hw + chan_off + target[None, :], a[None, :] * g_own, own, ACCUMULATE, ACC)
    if NEED_H:
        acc = tl.zeros([BLOCK_C, BLOCK_H * BLOCK_W], dtype=ACC)
        if HAS_SELF:
            s = tl.load(sw_ptr + map_base + target, mask=inside, other=0.0).to(ACC)
            acc += s[None, :] * g_own
        for j in range(K * K - 1):  # a loop, not static_range (register budget above)
            # the source pixel p whose neighbour j is this position: p = P - o_j
            dy, dx = _neighbour_offset(j, K)
            py = y - dy
            px = x - dx
            src_ok = (py >= 0) & (py < H) & (px >= 0) & (px < W) & in_padded
            src = py * W + px
            wj = tl.load(nw_base + j * hw + src, mask=src_ok, other=0.0).to(ACC)
            if HAS_RING:
                wj *= tl.load(rs_base + tl.load(ring_ptr + j) * hw + src, mask=src_ok, other=0.0).to(ACC)
            gv = tl.load(g_base + chan_off + src[None, :], mask=cmask & src_ok[None, :], other=0.0).to(ACC)
            acc += wj[None, :] * gv
        gh_ptrs = gh_ptr + b * C * hw + chan_off + target[None, :]
        acc = acc.to(gh_ptr.dtype.element_ty)
        tl.store(gh_ptrs, acc, mask=cmask & interior[None, :])
        tl.atomic_add(gh_ptrs, acc, mask=cmask & (in_padded & ~interior)[None, :])


def _launch_config(c: int, height: int, width: int, pad: int = 0) -> tuple[int, int, int, int]:
    """``(channel block, channel blocks, tiles across, tiles in total)`` for a map padded by ``pad`` on each
    side."""
    block_c = min(triton.next_power_of_2(c), _MAX_BLOCK_C)
    tiles_w = triton.cdiv(width + 2 * pad, _BLOCK_W)
    tiles_h = triton.cdiv(height + 2 * pad, _BLOCK_H)
    return block_c, triton.cdiv(c, block_c), tiles_w, tiles_w * tiles_h


def _acc_dtype(t: Tensor) -> Any:
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@functools.cache
def _rings(k: int, device: torch.device) -> Tensor:
    """Ring of each neighbour (``propagation.ring_index``) as int32 on the device, for the kernels
    (made once per kernel size and device: no host-to-device copy per step)."""
    r = k // 2
    rings = [max(abs(dy), abs(dx)) - 1 for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    return torch.tensor(rings, dtype=torch.int32, device=device)


def forward_step(h: Tensor, h0: Tensor, nw: Tensor, sw: Tensor | None, aw: Tensor | None, rs: Tensor | None,
                 k: int) -> Tensor:  # fmt: skip
    """One step's forward kernel on contiguous tensors (``fused_propagation``'s backend interface)."""
    b, c, height, width = h.shape
    out = torch.empty_like(h)
    block_c, cblocks, tiles_w, tiles = _launch_config(c, height, width)
    _forward_kernel[(tiles * cblocks, b)](
        h, h0, nw, sw if sw is not None else h, aw if aw is not None else h, rs if rs is not None else h,
        _rings(k, h.device), out,
        c, height, width, tiles_w, cblocks,
        K=k, HAS_SELF=sw is not None, HAS_ANCHOR=aw is not None, HAS_RING=rs is not None, ACC=_acc_dtype(h),
        BLOCK_C=block_c, BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


class TritonPropagateStep(torch.autograd.Function):
    """``propagate_step`` as three fused kernels: forward, weight gradients, ``h``/``h0`` gradients.

    With ``ring_scale`` the neighbour weights are ``neighbour_weight * ring_scale[:, ring(j)]`` (DySPN's
    factored form), multiplied inside the kernels; the backward returns the gradients of both factors.
    Takes contiguous tensors of one floating dtype on one device; ``propagate_step`` checks shapes
    and makes them contiguous before calling ``apply``.
    """

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


def backward_step(g: Tensor, h: Tensor, h0: Tensor, nw: Tensor, rs: Tensor | None, sw: Tensor | None,
                  aw: Tensor | None, grad_h: Tensor | None, grad_h0: Tensor | None, grad_nw: Tensor | None,
                  grad_rs: Tensor | None, grad_sw: Tensor | None, grad_aw: Tensor | None, *, kernel_size: int,
                  accumulate: bool) -> None:  # fmt: skip
    """One step's backward kernels into the given buffers (None: not wanted); with ``accumulate`` they
    add into ``grad_h0`` and ``grad_nw`` instead of overwriting them (``fused_propagation``'s backend
    interface). ``grad_h0`` is only written where ``aw`` is given."""
    k = kernel_size
    b, c, height, width = h.shape
    acc = _acc_dtype(h)
    if grad_nw is not None or grad_rs is not None or grad_sw is not None or grad_aw is not None:
        block_c, _, tiles_w, tiles = _launch_config(c, height, width)
        _grad_weights_kernel[(tiles, b)](
            g, h, h0, nw, rs if rs is not None else nw,
            grad_nw if grad_nw is not None else g, grad_rs if grad_rs is not None else g,
            grad_sw if grad_sw is not None else g, grad_aw if grad_aw is not None else g,
            c, height, width, tiles_w,
            K=k, NEED_NW=grad_nw is not None, NEED_RS=grad_rs is not None, HAS_RING=rs is not None,
            NEED_SELF=grad_sw is not None, NEED_ANCHOR=grad_aw is not None, ACCUMULATE=accumulate, ACC=acc,
            BLOCK_C=block_c, BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS,
        )  # fmt: skip
    need_h0 = grad_h0 is not None and aw is not None
    if grad_h is not None or need_h0:
        if grad_h is not None:
            # The border receives the folded padding by atomic_add: start it at zero.
            for border in (grad_h[:, :, 0], grad_h[:, :, -1], grad_h[:, :, :, 0], grad_h[:, :, :, -1]):
                border.zero_()
        block_c, cblocks, tiles_w, tiles = _launch_config(c, height, width, pad=k // 2)
        _grad_h_kernel[(tiles * cblocks, b)](
            g, nw, sw if sw is not None else nw, aw if aw is not None else nw, rs if rs is not None else nw,
            _rings(k, h.device), grad_h if grad_h is not None else g, grad_h0 if need_h0 else g,
            c, height, width, tiles_w, cblocks,
            K=k, HAS_SELF=sw is not None, HAS_RING=rs is not None, NEED_H=grad_h is not None, NEED_H0=need_h0,
            ACCUMULATE=accumulate, ACC=acc, BLOCK_C=block_c, BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W,
            num_warps=_NUM_WARPS,
        )  # fmt: skip


def propagate_triton(
    h0: Tensor, neighbour_weight: Tensor, per_step: list[tuple[Tensor | None, Tensor | None, Tensor | None]],
    kernel_size: int,
) -> list[Tensor]:  # fmt: skip
    """``h^1 .. h^T`` through ``fused_propagation.run_steps`` on these kernels (one autograd node).
    ``per_step``: each step's ``(self_weight, anchor_weight, ring_scale)``; shapes are checked by the
    caller (``propagation.propagate``)."""
    return run_steps(sys.modules[__name__], h0, neighbour_weight, per_step, kernel_size)


def propagate_step_triton(
    h: Tensor,
    h0: Tensor,
    neighbour_weight: Tensor,
    self_weight: Tensor | None,
    anchor_weight: Tensor | None,
    kernel_size: int,
    ring_scale: Tensor | None = None,
) -> Tensor:
    """One step through the fused kernels; same arguments and shapes as ``propagate_step``.

    Shapes are not checked here (``propagate_step`` does); tensors are made contiguous.
    """
    tensors = [t.contiguous() if t is not None else None
               for t in (h, h0, neighbour_weight, self_weight, anchor_weight, ring_scale)]  # fmt: skip
    return TritonPropagateStep.apply(*tensors, kernel_size)


def compiled_resources(kernel_size: int, channels: int, arch: int = 90, *, aligned: bool = True,
                       dtype: str = "fp32") -> list[dict[str, Any]]:  # fmt: skip
    """Registers and stack (spills) per thread of each kernel as launched on ``channels`` channels, compiled
    ahead of time for CUDA compute capability ``arch`` (90: H100) with the ptxas and cuobjdump that come with
    triton: no GPU needed. The widest variant of each kernel (DySPN's factored weights, self and anchor
    weights, every gradient, accumulating), plus the weight gradients of CSPN (no ring scale).

    ``aligned``: compiled as a launch on a map whose H, W and tile count are multiples of 16 specialises it
    (triton's ``tt.divisibility`` hints, which every torch pointer gets too), else as one that is not.
    ``dtype``: ``"fp32"`` or ``"fp64"`` tensors (accumulating in the same type).

    Returns ``[{"kernel", "registers", "stack", "local"}]``; raises ``RuntimeError`` where this triton
    cannot compile for CUDA (no NVIDIA backend, ``TRITON_INTERPRET`` set, or the compiler failed)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise RuntimeError(f"no cuobjdump at {cuobjdump}: this triton has no NVIDIA backend")
    if not isinstance(_forward_kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels are interpreted here (TRITON_INTERPRET is set): nothing to compile")
    block_c = _launch_config(channels, 1, 1)[0]
    acc = {"fp32": tl.float32, "fp64": tl.float64}[dtype]
    common = {"K": kernel_size, "ACC": acc, "BLOCK_C": block_c, "BLOCK_H": _BLOCK_H, "BLOCK_W": _BLOCK_W}
    weights = {"NEED_NW": True, "NEED_SELF": True, "NEED_ANCHOR": True, "ACCUMULATE": True}
    variants = [
        ("forward", _forward_kernel, {"HAS_SELF": True, "HAS_ANCHOR": True, "HAS_RING": True}),
        ("grad_weights", _grad_weights_kernel, {**weights, "NEED_RS": True, "HAS_RING": True}),
        ("grad_weights_cspn", _grad_weights_kernel, {**weights, "NEED_RS": False, "HAS_RING": False}),
        ("grad_h", _grad_h_kernel,
         {"HAS_SELF": True, "HAS_RING": True, "NEED_H": True, "NEED_H0": True, "ACCUMULATE": True}),
    ]  # fmt: skip
    found = []
    for name, kernel, flags in variants:
        constants = {**common, **flags}
        signature = {arg: "constexpr" if arg in constants else _arg_type(arg, dtype) for arg in kernel.arg_names}
        hinted = [i for i, arg in enumerate(kernel.arg_names) if arg.endswith("_ptr") or arg in ("H", "W", "tiles_w")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in hinted} if aligned else {}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": _NUM_WARPS})  # fmt: skip
            with tempfile.TemporaryDirectory() as folder:
                cubin = os.path.join(folder, f"{name}.cubin")
                with open(cubin, "wb") as f:
                    f.write(compiled.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True)
        except Exception as exc:  # triton's CompilationError, PTXASError, cuobjdump failing, ...
            raise RuntimeError(f"compiling {name} (k={kernel_size}, sm_{arch}) failed: {exc}") from exc
        match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout)
        if match is None:
            raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {name}: {usage.stdout!r}")
        registers, stack, local = (int(v) for v in match.groups())
        found.append({"kernel": name, "registers": registers, "stack": stack, "local": local})
    return found


def _arg_type(arg: str, dtype: str) -> str:
    """A kernel argument's type in a triton signature: the ring table is int32, the maps ``dtype``."""
    if not arg.endswith("_ptr"):
        return "i32"
    return "*i32" if arg == "ring_ptr" else f"*{dtype}"
