"""The fused C++/OpenMP propagation kernels: parity with the unfold reference on the shapes that take
the kernels' edge paths, determinism across thread counts, dispatch, and building (cache, concurrent
builders, no compiler, a failing compiler, an unwritable cache folder).

``tests/test_propagation.py`` runs its whole suite on this backend too.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from spntune.models import cpu_propagation
from spntune.models.propagation import (
    _CSPNNormalise,
    _RingSums,
    cspn_weights,
    dyspn_factored_weights,
    dyspn_guidance_weights,
    dyspn_ring_sums,
    dyspn_weights,
    num_rings,
    propagate,
    propagate_step,
    propagate_step_reference,
    set_propagation_backend,
)

pytestmark = pytest.mark.skipif(cpu_propagation.library() is None, reason="no C++ compiler to build the kernels")


@pytest.fixture(autouse=True)
def cpp_backend():
    set_propagation_backend("cpp")
    yield
    set_propagation_backend(None)


def _leaves(k, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    return [
        torch.randn(b, c, h, w, generator=g, dtype=dtype).requires_grad_(),
        torch.randn(b, c, h, w, generator=g, dtype=dtype).requires_grad_(),
        torch.randn(b, k * k - 1, h, w, generator=g, dtype=dtype).requires_grad_(),
        torch.rand(b, num_rings(k) + 1, h, w, generator=g, dtype=dtype).requires_grad_(),
    ]


def _weights(variant, k, aff, att):
    if variant == "dyspn-factored":  # (affinity, self, anchor, ring_scale): the kernels form the product
        return dyspn_factored_weights(aff, att, k)
    return dyspn_weights(aff, att, k) if variant == "dyspn" else cspn_weights(aff, variant.split("-")[1])


VARIANTS = ("cspn-h0", "cspn-ht", "dyspn", "dyspn-factored")


def _errors(step, k, variant, shape, dtype):
    """Relative max errors of the output and every leaf's gradient against the unfold reference."""
    leaves = _leaves(k, shape, dtype)
    h, h0, aff, att = leaves
    w = _weights(variant, k, aff, att)
    out = step(h, h0, *w[:3], k, *w[3:])
    ref = propagate_step_reference(h, h0, *w[:3], k, *w[3:])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = torch.autograd.grad(out, leaves, grad_out, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, leaves, grad_out, allow_unused=True)
    errors = {"forward": ((out - ref).abs().max() / ref.abs().max().clamp_min(1)).item()}
    for name, a, b in zip(("h", "h0", "affinity", "attention"), got, want):
        if b is None:
            assert a is None, name
        else:
            errors[name] = ((a - b).abs().max() / b.abs().max().clamp_min(1)).item()
    return errors


# Rows narrower than a vector (scalar path), wider with a partial last vector, one row, one column, one
# channel, channel counts that split into uneven register blocks (11 -> 6 + 5, 21 -> 7 + 7 + 7), a map
# smaller than the window.
SHAPES = [(2, 3, 9, 10), (1, 5, 7, 40), (1, 1, 3, 3), (2, 11, 12, 33), (1, 4, 1, 20), (1, 2, 20, 1), (1, 21, 6, 17)]


@pytest.mark.parametrize("k", [3, 5, 7, 9])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_in_float64(k, shape):
    for variant in VARIANTS:
        errors = _errors(propagate_step, k, variant, shape, torch.float64)
        assert max(errors.values()) <= 1e-12, (variant, errors)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_matches_reference_in_float32(k):
    # widths: aligned chunks then an overlapping last one (70), only aligned ones (32: the stencil block's
    # second load reaches the ring row's spare vector), an odd count of aligned chunks then an overlapping one
    # (46), more aligned chunks than the forward packs at a time (1100: 137 of 8 lanes, SPN_SEG = 128), narrower
    # than a vector (7)
    for shape in ((2, 11, 24, 70), (1, 6, 10, 32), (1, 5, 9, 46), (1, 3, 4, 1100), (1, 3, 5, 7)):
        for variant in ("cspn-h0", "dyspn", "dyspn-factored"):
            errors = _errors(propagate_step, k, variant, shape, torch.float32)
            assert max(errors.values()) <= 2e-5, (shape, variant, errors)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_3x3_rows_of_whole_vectors_match_the_reference(variant, dtype, tol):
    """3x3 steps on rows a whole number of vectors wide (16 float32 or 8 float64 lanes with AVX-512, 8 / 4
    with AVX2) run their backward on rows one from the border in one sweep (fused_backward_row3: grad_h's
    gather with the border folds, the weight gradients, the self and anchor terms): every gradient against the
    unfold reference, at one inner row (height 3), several, one vector per row, and 11 channels; DySPN's
    factored weights too (the affinity's gradient times the ring scale, the ring scale's summed over the window)."""
    for shape in ((2, 5, 3, 32), (1, 11, 7, 64), (2, 3, 6, 16)):
        errors = _errors(propagate_step, 3, variant, shape, dtype)
        assert max(errors.values()) <= tol, (shape, errors)


def test_the_library_reports_its_vector_width():
    # 64 bytes where -march=native enables AVX-512, else 32 (SPN_VBYTES in propagation_cpu.cpp)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_propagation.vector_bytes() == (64 if " avx512f" in flags else 32)


@pytest.mark.slow
def test_the_other_vector_width_matches_the_reference(tmp_path, monkeypatch):
    """The default suite checks the vector width this CPU builds with; this builds the other one (a minute's
    compile at 64 bytes on an AVX2 CPU) and runs the default suite's kernel checks on it: every edge shape,
    k = 3..9 in float64 (the stencil path where its lanes allow the radius, the window path elsewhere),
    float32 at aligned, overlapping and narrow rows, T steps as one node, the normalisation and ring-sum
    kernels."""
    other = 32 if cpu_propagation.vector_bytes() == 64 else 64
    lib = cpu_propagation._load(cpu_propagation.build_library(tmp_path, (f"-DSPN_VBYTES={other}",)))
    assert cpu_propagation.vector_bytes(lib) == other
    monkeypatch.setattr(cpu_propagation, "library", lambda: lib)
    for k in (3, 5, 7, 9):
        for shape in SHAPES:
            test_matches_reference_in_float64(k, shape)
    for k in (3, 5, 7):
        test_matches_reference_in_float32(k)
    for variant in VARIANTS:
        for k, shape in ((3, (2, 3, 9, 21)), (7, (1, 11, 12, 40))):
            test_propagate_runs_all_steps_as_one_node_equal_to_step_by_step(variant, k, shape)
    # streamed outputs (with 64-byte vectors the weight gradients go straight from dot_stencil to grad_nw)
    for variant in ("cspn-h0", "dyspn-factored"):
        test_weight_gradients_of_32_mb_and_more_match_the_reference(variant)
    for k in (3, 7):
        test_spread_prefetching_gives_the_same_results(k, torch.float64, monkeypatch)
    # the normalisation and ring-sum kernels against torch's ops (those tests end on the torch backend)
    for shape, dtype, tol in (((3, 24, 19, 37), torch.float64, 1e-12), ((2, 48, 13, 40), torch.float32, 1e-5)):
        set_propagation_backend("cpp")
        test_fused_cspn_normalisation_matches_the_torch_ops(shape, dtype, tol, "both")
        set_propagation_backend("cpp")
        test_fused_ring_sums_match_the_torch_ops(7, (shape[0], 48, *shape[2:]), dtype, tol, "both")
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        set_propagation_backend("cpp")
        test_fused_dyspn_step_weights_match_the_torch_ops(7, dtype, tol, "all")


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("shape", [(2, 5, 9, 23), (1, 3, 6, 5)], ids=["wide-rows", "narrow-rows"])
def test_self_and_anchor_gradients_without_neighbour_gradients(k, shape):
    # Frozen neighbour weights: the kernels then sum grad_sw and grad_aw on their own, not in the weight
    # gradients' pass (Extras in propagation_cpu.cpp).
    g = torch.Generator().manual_seed(3)
    b, _, hgt, wid = shape
    h, h0 = (torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    nw = torch.randn(b, k * k - 1, hgt, wid, generator=g, dtype=torch.float64)
    sw, aw = (torch.randn(b, 1, hgt, wid, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    out = propagate_step(h, h0, nw, sw, aw, k)
    assert type(out.grad_fn).__name__ == "FusedCPUStepBackward"
    ref = propagate_step_reference(h, h0, nw, sw, aw, k)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (h, h0, sw, aw), grad_out)
    want = torch.autograd.grad(ref, (h, h0, sw, aw), grad_out)
    for a, b_ in zip(got, want, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["cspn-h0", "dyspn-factored"])
def test_weight_gradients_of_32_mb_and_more_match_the_reference(variant):
    # [2, 48, 176, 256] float64 is 34.6 MB: the backward writes such weight gradients with non-temporal
    # stores (st_stream): with 64-byte vectors straight from dot_stencil, the ring scale's gradient summed
    # there too (DySPN); with 32-byte vectors through the scratch block
    errors = _errors(propagate_step, 7, variant, (2, 2, 176, 256), torch.float64)
    assert max(errors.values()) <= 1e-12, errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [3, 7])
def test_spread_prefetching_gives_the_same_results(k, dtype, monkeypatch):
    """A step larger than the last-level cache prefetches spread over the row before (RowPrefetch) and
    writes its outputs with non-temporal stores, a smaller one prefetches in bursts and stores plainly: a
    cache of 0 bytes forces the first, of 1 TB the second. Results are bitwise the same and match the
    reference, with more rows to prefetch than the list holds (150 channels of h and h0: 300 rows, past
    its 256, the rest in bursts), rows of whole vectors (64: grad_h's border folds in the vector path) and
    of a partial last one, and rows narrower than a vector."""
    from spntune.models import cpu_propagation

    for shape in ((2, 11, 12, 40), (2, 11, 9, 64), (1, 150, 5, 20), (1, 3, 6, 7)):
        for variant in ("cspn-h0", "dyspn-factored"):
            results = []
            for cache in (1 << 40, 0):
                monkeypatch.setattr(cpu_propagation, "_CACHE_BYTES", cache)
                h, h0, aff, att = _leaves(k, shape, dtype)
                w = _weights(variant, k, aff, att)
                out = propagate_step(h, h0, *w[:3], k, *w[3:])
                results.append([out, *torch.autograd.grad(out, (h, h0, aff, att), torch.ones_like(out),
                                                          allow_unused=True)])  # fmt: skip
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(*results, strict=True)), (shape, variant)
            errors = _errors(propagate_step, k, variant, shape, dtype)  # still spread (cache 0)
            assert max(errors.values()) <= (1e-12 if dtype == torch.float64 else 2e-5), (shape, variant, errors)


def _normalise(affinity, grad_kappa, grad_centre, floor=1e-6):
    """``(kappa_hat, centre, d affinity)`` through ``_CSPNNormalise`` on the current backend, the gradient
    from the given output gradients (None: that output unused)."""
    leaf = affinity.detach().clone().requires_grad_()
    kappa, centre = _CSPNNormalise.apply(leaf, floor)
    pairs = [(t, g) for t, g in ((kappa, grad_kappa), (centre, grad_centre)) if g is not None]
    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return kappa.detach(), centre.detach(), leaf.grad


@pytest.mark.parametrize(
    ("shape", "dtype", "tol"),
    [
        ((2, 8, 5, 6), torch.float64, 1e-12),  # fewer pixels than one block, rows narrower than a vector
        ((3, 24, 19, 37), torch.float64, 1e-12),  # 703 pixels: a whole block and a part, an unaligned tail
        ((2, 48, 176, 256), torch.float64, 1e-12),  # 34.6 MB: kappa and the gradient go out through st_stream
        ((2, 48, 13, 40), torch.float32, 1e-5),
    ],
)
@pytest.mark.parametrize("use", ["both", "kappa", "centre"])
def test_fused_cspn_normalisation_matches_the_torch_ops(shape, dtype, tol, use):
    """``cspn_weights``' normalisation on the C++ kernels (one pass over the affinity, forward and backward)
    against the same autograd node on torch's ops, with an all-zero pixel, a zero affinity and a tie at the
    clamped floor; and that the kernels ran."""
    g = torch.Generator().manual_seed(7)
    b, k, h, w = shape
    a = torch.randn(shape, generator=g, dtype=dtype)
    a[0, :, 0, 0] = 0.0
    a[0, 3, 1, 2] = 0.0
    a[1, :, 1, 1] = 1.0 / k
    a[1, 0, 1, 1] = -1.0 / k if k in (8, 16, 32) else a[1, 0, 1, 1]  # |.| sums to the floor 1 exactly
    grad_kappa = torch.randn(shape, generator=g, dtype=dtype) if use in ("both", "kappa") else None
    grad_centre = torch.randn(b, 1, h, w, generator=g, dtype=dtype) if use in ("both", "centre") else None
    floor = 1.0 if k == 8 else 1e-6
    calls = []
    fused, fused_backward = cpu_propagation.cspn_normalise, cpu_propagation.cspn_normalise_backward

    def counted(fn):
        def inner(*args):
            out = fn(*args)
            calls.append(fn.__name__ if out is not None else "declined")
            return out

        return inner

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_propagation, "cspn_normalise", counted(fused))
        mp.setattr(cpu_propagation, "cspn_normalise_backward", counted(fused_backward))
        mine = _normalise(a, grad_kappa, grad_centre, floor)
    assert calls == ["cspn_normalise", "cspn_normalise_backward"]
    set_propagation_backend("torch")
    theirs = _normalise(a, grad_kappa, grad_centre, floor)
    for x, y in zip(mine, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _declined_is_an_error(out):
    assert out is not None, "the kernels declined: the comparison would be torch against torch"
    return out


def _kernels_match_torch(run, names, tol):
    """``run()`` on the C++ backend, where it must call the kernels ``cpu_propagation.<names>`` in that order,
    each taking its tensors (``_declined_is_an_error``), against ``run()`` on torch's ops: equal within ``tol``."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            fn = getattr(cpu_propagation, name)
            mp.setattr(cpu_propagation, name,
                       lambda *args, fn=fn, name=name, **kw: calls.append(name) or _declined_is_an_error(fn(*args, **kw)))  # fmt: skip
        mine = run()
    assert calls == list(names)
    set_propagation_backend("torch")
    for x, y in zip(mine, run(), strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_cspn_normalisation_of_a_channels_last_affinity(use_kernels):
    """A channels-last affinity (train.channels_last on the CPU) gives what its contiguous copy gives,
    forward and gradient, on both paths."""
    if not use_kernels:
        set_propagation_backend("torch")
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 24, 9, 14, generator=g, dtype=torch.float64)
    grads = (torch.randn(2, 24, 9, 14, generator=g, dtype=torch.float64),
             torch.randn(2, 1, 9, 14, generator=g, dtype=torch.float64))  # fmt: skip
    mine = _normalise(a.contiguous(memory_format=torch.channels_last), *grads)
    theirs = _normalise(a, *grads)
    for x, y in zip(mine, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)


def test_fused_cspn_normalisation_gradcheck():
    a = torch.randn(2, 8, 4, 21, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: _CSPNNormalise.apply(x, 1e-6), (a.requires_grad_(),))


@pytest.mark.parametrize(
    ("k", "shape", "dtype", "tol"),
    [
        (3, (2, 8, 5, 6), torch.float64, 1e-12),
        (5, (3, 24, 19, 37), torch.float64, 1e-12),
        (7, (2, 48, 176, 256), torch.float64, 1e-12),  # 34.6 MB: the gradient goes out through st_stream
        (7, (2, 48, 13, 40), torch.float32, 1e-5),
    ],
)
@pytest.mark.parametrize("use", ["both", "sum", "abs_sum"])
def test_fused_ring_sums_match_the_torch_ops(k, shape, dtype, tol, use):
    """DySPN's ring sums on the C++ kernels against the same autograd node on torch's ops, forward and
    gradient, with zero affinities, each output alone; and that the kernels ran."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(shape, generator=g, dtype=dtype)
    a[0, :, 1, 1] = 0.0
    a[1, 2, 3, 3] = 0.0
    b, _, h, w = shape
    grads = [torch.randn(b, num_rings(k), h, w, generator=g, dtype=dtype) if use in (name, "both") else None
             for name in ("sum", "abs_sum")]  # fmt: skip

    def run():
        leaf = a.clone().requires_grad_()
        sums = _RingSums.apply(leaf, k)
        pairs = [(t, gr) for t, gr in zip(sums, grads, strict=True) if gr is not None]
        torch.autograd.backward([t for t, _ in pairs], [gr for _, gr in pairs])
        return (*[t.detach() for t in sums], leaf.grad)

    _kernels_match_torch(run, ("ring_sums", "ring_sums_backward"), tol)


@pytest.mark.parametrize(("k", "dtype"), [(3, torch.float64), (7, torch.float32)])
def test_dyspn_step_weights_backward_through_the_sigmoid_into_a_channel_slice(k, dtype):
    """With logits_out the step weights' backward writes the attention logits' gradient (through the sigmoid)
    into a channel slice of a larger tensor, what DySPN's weights node does with the guidance's gradient:
    bit for bit torch's sigmoid_backward of the plain gradient, the channels around it untouched; the other
    two gradients unchanged. A slice whose channels are not contiguous is refused."""
    g = torch.Generator().manual_seed(6)
    b, h, w, r = 2, 5, 37, num_rings(k)  # 37 columns: the kernels' blocks end mid-row
    att = torch.rand(b, r + 1, h, w, generator=g, dtype=dtype) * 0.98 + 0.01  # a sigmoid's output
    sums = [torch.randn(b, r, h, w, generator=g, dtype=dtype) for _ in range(2)]
    sums[1] = sums[1].abs() + sums[0].abs()  # abs sums at least as large as the sums
    grads = (torch.randn(b, 1, h, w, generator=g, dtype=dtype), torch.randn(b, 1, h, w, generator=g, dtype=dtype),
             torch.randn(b, r, h, w, generator=g, dtype=dtype))  # fmt: skip
    plain = cpu_propagation.dyspn_step_weights_backward(att, *sums, grads, (True, True, True), 1e-6)
    big = torch.full((b, r + 4, h, w), 7.0, dtype=dtype)
    fused = cpu_propagation.dyspn_step_weights_backward(att, *sums, grads, (True, True, True), 1e-6,
                                                        logits_out=big[:, 2 : 3 + r])  # fmt: skip
    assert plain is not None and fused is not None
    assert fused[0] is not None and fused[0].data_ptr() == big[:, 2:].data_ptr()
    assert torch.equal(big[:, 2 : 3 + r], torch.ops.aten.sigmoid_backward(plain[0], att))
    assert torch.equal(big[:, :2], torch.full_like(big[:, :2], 7.0)) and torch.equal(
        big[:, 3 + r :], big[:, 3 + r :] * 0 + 7
    )
    assert torch.equal(fused[1], plain[1]) and torch.equal(fused[2], plain[2])
    with pytest.raises(ValueError, match="channels contiguous"):
        cpu_propagation.dyspn_step_weights_backward(att, *sums, grads, (True, True, True), 1e-6,
                                                    logits_out=torch.empty(b, h, r + 1, w, dtype=dtype).transpose(1, 2))  # fmt: skip


def test_weight_kernels_refuse_shapes_they_would_read_past():
    """The weight-forming kernels take their sizes from one tensor (the DySPN step weights' from the ring sums, the
    ring sums' and CSPN normalisation's from the affinity): an attention with R channels instead of R+1 (a guidance
    cut one channel short), ring sums of two shapes, an affinity of another kernel size or a gradient of another
    shape is refused with a ValueError naming it, before the kernel reads past a tensor's end."""
    if cpu_propagation.library() is None:
        pytest.skip("no C++ compiler here: the kernels do not run")
    b, r, h, w = 2, 3, 4, 5
    att, rsum, rabs = torch.rand(b, r + 1, h, w), torch.randn(b, r, h, w), torch.rand(b, r, h, w)
    grads = (torch.randn(b, 1, h, w), torch.randn(b, 1, h, w), torch.randn(b, r, h, w))
    assert cpu_propagation.dyspn_step_weights(att, rsum, rabs, 1e-6) is not None
    assert cpu_propagation.dyspn_step_weights_backward(att, rsum, rabs, grads, (True, True, True), 1e-6) is not None
    with pytest.raises(ValueError, match=r"attention must be \[2, 4, 4, 5\].*got \[2, 3, 4, 5\]"):
        cpu_propagation.dyspn_step_weights(att[:, :r], rsum, rabs, 1e-6)
    with pytest.raises(ValueError, match="ring_abs_sum must be"):
        cpu_propagation.dyspn_step_weights(att, rsum, rabs[:, :2], 1e-6)
    with pytest.raises(ValueError, match="attention must be"):
        cpu_propagation.dyspn_step_weights_backward(att[:, :, :3], rsum, rabs, grads, (True, True, True), 1e-6)
    with pytest.raises(ValueError, match=r"grad_ring_scale must be \[2, 3, 4, 5\]"):
        cpu_propagation.dyspn_step_weights_backward(att, rsum, rabs, (*grads[:2], grads[2][:, :2]),
                                                    (True, True, True), 1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="grad_self must be"):
        cpu_propagation.dyspn_step_weights_backward(att, rsum, rabs, (grads[0][:, :, :2], None, None),
                                                    (True, True, True), 1e-6)  # fmt: skip
    # the weight-forming kernels around them take their sizes from the affinity and kernel_size
    aff = torch.randn(b, 48, h, w)
    with pytest.raises(ValueError, match=r"affinity must be \[2, 8, 4, 5\] for kernel_size=3, got \[2, 48, 4, 5\]"):
        cpu_propagation.ring_sums(aff, 3)
    with pytest.raises(ValueError, match=r"grad_sum must be \[2, 3, 4, 5\]"):
        cpu_propagation.ring_sums_backward(aff, rsum[:, :2], None, 7)
    with pytest.raises(ValueError, match="addend must be"):
        cpu_propagation.ring_sums_backward(aff, rsum, rabs, 7, addend=aff[:, :8])
    assert cpu_propagation.ring_sums_backward(aff, rsum, rabs, 7, addend=aff) is not None
    saved = cpu_propagation.cspn_normalise(aff, 1e-6)[1:4]
    with pytest.raises(ValueError, match=r"grad_kappa must be \[2, 48, 4, 5\]"):
        cpu_propagation.cspn_normalise_backward(aff, aff[:, :8], None, saved, 1e-6)
    with pytest.raises(ValueError, match="grad_centre must be"):
        cpu_propagation.cspn_normalise_backward(aff, aff, aff[:, :2], saved, 1e-6)
    assert cpu_propagation.cspn_normalise_backward(aff, aff, aff[:, :1], saved, 1e-6) is not None


def test_stream_rows_reads_every_input_row_and_writes_every_output_row():
    """make bench's streaming floor moves exactly the maps it is given: the sum it returns is every input
    element's (37 columns: the vector loop and the scalar tail), every output element is written, and maps of
    another size are refused; float64 is not measured (None)."""
    g = torch.Generator().manual_seed(5)
    ins = [torch.rand(3, c, 5, 37, generator=g) for c in (2, 7, 1)]
    outs = [torch.full((3, c, 5, 37), float("nan")) for c in (4, 1)]
    total = cpu_propagation.stream_rows(ins, outs)
    assert total == pytest.approx(sum(t.double().sum().item() for t in ins), rel=1e-5)
    assert not any(o.isnan().any() for o in outs)
    with pytest.raises(ValueError, match="one B, H and W"):
        cpu_propagation.stream_rows(ins, [torch.empty(3, 1, 5, 36)])
    assert cpu_propagation.stream_rows([t.double() for t in ins], [o.double() for o in outs]) is None


@pytest.mark.parametrize(("k", "dtype"), [(3, torch.float64), (7, torch.float32)])
@pytest.mark.parametrize("sums", ["both", "abs_sum"])
def test_ring_sums_backward_adds_its_addend_into_a_channel_slice(k, dtype, sums):
    """ring_sums_backward with an addend, written into the affinity's channels of a larger tensor (what DySPN's
    weights node does with the propagation's gradient): bit for bit the plain gradient plus the addend, and
    the channels around the slice untouched. A slice whose channels are not contiguous is refused."""
    g = torch.Generator().manual_seed(4)
    b, h, w = 3, 7, 37  # 37 columns: the kernel's vector loop and its scalar tail
    n, r = k * k - 1, num_rings(k)
    a = torch.randn(b, n, h, w, generator=g, dtype=dtype)
    a[0, 1, 2, 3] = 0.0
    g_sum = torch.randn(b, r, h, w, generator=g, dtype=dtype) if sums == "both" else None
    g_abs = torch.randn(b, r, h, w, generator=g, dtype=dtype)
    addend = torch.randn(b, n, h, w, generator=g, dtype=dtype)
    plain = cpu_propagation.ring_sums_backward(a, g_sum, g_abs, k)
    big = torch.full((b, n + 5, h, w), 7.0, dtype=dtype)
    out = cpu_propagation.ring_sums_backward(a, g_sum, g_abs, k, addend=addend, out=big[:, 2 : 2 + n])
    assert out is not None and plain is not None
    assert out.data_ptr() == big[:, 2:].data_ptr()
    assert torch.equal(big[:, 2 : 2 + n], plain + addend)
    assert torch.equal(big[:, :2], torch.full_like(big[:, :2], 7.0))
    assert torch.equal(big[:, 2 + n :], torch.full_like(big[:, 2 + n :], 7.0))
    with pytest.raises(ValueError, match="channels contiguous"):
        cpu_propagation.ring_sums_backward(a, g_sum, g_abs, k, out=torch.empty(b, h, n, w, dtype=dtype).transpose(1, 2))


@pytest.mark.parametrize(("k", "dtype", "tol"), [(3, torch.float64, 1e-12), (5, torch.float64, 1e-12),
                                                  (7, torch.float64, 1e-12), (7, torch.float32, 1e-5)])  # fmt: skip
@pytest.mark.parametrize("use", ["all", "self", "anchor", "ring_scale"])
def test_fused_dyspn_step_weights_match_the_torch_ops(k, dtype, tol, use):
    """One DySPN step's self, anchor and ring-scale maps from its attention (``_DySPNStepWeights``) on the C++
    kernels against ``dyspn_factored_weights``' torch ops, forward and the gradients of affinity and attention,
    with every output used or one alone; the attention a slice of a larger guidance, as the refiner's split
    (14 x 37 pixels: a whole block of the kernels' pixel loop and a part of one); and that the kernels ran."""
    g = torch.Generator().manual_seed(11)
    b, h, w, rings = 2, 14, 37, num_rings(k)
    aff = torch.randn(b, k * k - 1, h, w, generator=g, dtype=dtype)
    guidance = torch.rand(b, 2 * (rings + 1), h, w, generator=g, dtype=dtype)
    names = ("self", "anchor", "ring_scale")
    grads = [torch.randn(b, n, h, w, generator=g, dtype=dtype) if use in (name, "all") else None
             for name, n in zip(names, (1, 1, rings), strict=True)]  # fmt: skip

    def run():
        a, gd = aff.clone().requires_grad_(), guidance.clone().requires_grad_()
        attention = gd[:, rings + 1 :]  # the second step's attention: a view, not contiguous
        _, *maps = dyspn_factored_weights(a, attention, k)
        pairs = [(t, gr) for t, gr in zip(maps, grads, strict=True) if gr is not None]
        torch.autograd.backward([t for t, _ in pairs], [gr for _, gr in pairs])
        return (*[t.detach() for t in maps], a.grad, gd.grad)

    _kernels_match_torch(run, ("dyspn_step_weights", "dyspn_step_weights_backward"), tol)


def test_fused_dyspn_step_weights_gradcheck_and_mismatched_shapes():
    k = 7
    g = torch.Generator().manual_seed(12)
    aff = torch.randn(1, 48, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    att = (torch.rand(1, 4, 4, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    _, sw, _, _ = dyspn_factored_weights(aff, att, k)
    assert type(sw.grad_fn).__name__ == "_DySPNStepWeightsBackward"
    assert torch.autograd.gradcheck(lambda a, t: dyspn_factored_weights(a, t, k)[1:], (aff, att))
    # an attention of another size than the affinity is not given to the kernels (they would read past its
    # end): torch's ops refuse it
    with pytest.raises(RuntimeError, match="size of tensor"):
        dyspn_factored_weights(aff, att[:, :, :3], k)


def _guidance(k, iterations, shape, dtype, seed=13):
    b, _, h, w = shape
    channels = k * k - 1 + (num_rings(k) + 1) * iterations
    return torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("k, iterations", [(3, 1), (5, 2), (7, 3)])
def test_dyspn_weights_from_the_guidance_in_one_node_equal_the_op_by_op_path(k, iterations, dtype, tol,
                                                                             monkeypatch):  # fmt: skip
    """DySPNRefiner.step_weights on the CPU kernels is one node (dyspn_guidance_weights); forced off, the refiner
    forms the same weights op by op (split, sigmoid, ring sums, per-step weights): equal values, and equal
    gradients of the guidance through T propagation steps."""
    from spntune.models import refiners

    shape = (2, 3, 9, 11)
    refiner = refiners.DySPNRefiner(3, k, iterations)
    h0 = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    loss_weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=dtype)

    def run(fused):
        if not fused:
            monkeypatch.setattr(refiners, "dyspn_guidance_weights", lambda *args: None)
        g = _guidance(k, iterations, shape, dtype)
        weights = refiner.step_weights(g)
        assert (type(weights[0][1].grad_fn).__name__ == "_DySPNGuidanceWeightsBackward") == fused
        assert all(step[0] is weights[0][0] for step in weights)  # one affinity tensor: one propagation node
        out, _ = propagate(h0, weights, k)
        (out * loss_weight).sum().backward()
        monkeypatch.undo()
        return [t.detach() for step in weights for t in step], out.detach(), g.grad

    fused, plain = run(True), run(False)
    for a, b in zip(fused[0], plain[0], strict=True):
        assert torch.equal(a, b)  # the same kernels and ops forward
    assert torch.equal(fused[1], plain[1])
    torch.testing.assert_close(fused[2], plain[2], rtol=tol, atol=tol)  # sums taken in another order


def test_dyspn_weights_from_the_guidance_gradcheck_with_unused_steps():
    k, iterations = 5, 3
    g = _guidance(k, iterations, (1, 0, 4, 6), torch.float64)
    h0 = torch.rand(1, 2, 4, 6, dtype=torch.float64)

    def through_propagation(x):
        return propagate(h0, dyspn_guidance_weights(x, k, iterations), k)[0]

    def some_outputs(x):  # step 0's ring scale and step 2's anchor only: the other steps get no gradient
        weights = dyspn_guidance_weights(x, k, iterations)
        return weights[0][3].pow(2).sum() + 2 * weights[2][2].sum()

    assert torch.autograd.gradcheck(through_propagation, (g,))
    assert torch.autograd.gradcheck(some_outputs, (g,))
    weights = dyspn_guidance_weights(g, k, iterations)
    weights[1][1].sum().backward()  # only step 1's self weight: the affinity's and the other steps' channels
    n, per = k * k - 1, num_rings(k) + 1  # get the ring sums' share or zeros
    assert g.grad[:, n : n + per].abs().sum() == 0 and g.grad[:, n + 2 * per :].abs().sum() == 0
    assert g.grad[:, n + per : n + 2 * per].abs().sum() > 0 and g.grad[:, :n].abs().sum() > 0


def test_dyspn_weights_from_the_guidance_decline_what_the_kernels_do_not_run():
    k, iterations = 3, 2
    g = _guidance(k, iterations, (1, 0, 4, 6), torch.float32)
    assert dyspn_guidance_weights(g[:, :-1], k, iterations) is None  # not k*k-1 + (R+1)*T channels
    assert dyspn_guidance_weights(g.detach().half(), k, iterations) is None  # a dtype the kernels do not take
    set_propagation_backend("torch")
    assert dyspn_guidance_weights(g, k, iterations) is None  # the shifted-slice backend: torch's ops
    with torch.no_grad():
        set_propagation_backend("cpp")
        weights = dyspn_guidance_weights(g, k, iterations)  # no autograd: the forward alone
    assert len(weights) == iterations and weights[0][0].grad_fn is None


def test_gradcheck_of_chained_steps():
    k = 3
    _, h0, aff, att = _leaves(k, (1, 2, 5, 19), torch.float64)

    def dyspn(h0, aff, att):
        return propagate(h0, [dyspn_weights(aff, att, k)] * 2, k)[0]

    def dyspn_factored(h0, aff, att):
        sums = dyspn_ring_sums(aff, k)
        return propagate(
            h0, [dyspn_factored_weights(aff, att, k, sums), dyspn_factored_weights(aff, att * 0.5, k, sums)], k
        )[0]

    def cspn(h0, aff):
        return propagate(h0, [cspn_weights(aff, "ht")] * 3, k)[0]

    def cspn_h0(h0, aff):  # the anchor on h0: every step adds into h0's gradient
        return propagate(h0, [cspn_weights(aff, "h0")] * 3, k)[0]

    assert torch.autograd.gradcheck(dyspn, (h0, aff, att))
    assert torch.autograd.gradcheck(dyspn_factored, (h0, aff, att))
    assert torch.autograd.gradcheck(cspn, (h0, aff))
    assert torch.autograd.gradcheck(cspn_h0, (h0, aff))


def _step_weights(variant, k, aff, att):
    """Three steps' weights sharing one neighbour tensor, as the refiners build them."""
    if variant == "dyspn-factored":
        sums = dyspn_ring_sums(aff, k)
        return [dyspn_factored_weights(aff, att * s, k, sums) for s in (1.0, 0.5, 0.25)]
    return [_weights(variant, k, aff, att)] * 3


def _step_by_step(h0, weights, k):
    hs, h = [], h0
    for w in weights:
        h = propagate_step(h, h0, *w[:3], k, *w[3:])
        hs.append(h)
    return hs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k, shape", [(3, (2, 3, 9, 21)), (3, (2, 3, 9, 32)), (7, (1, 11, 12, 40))],
                         ids=["3x3", "3x3-whole-vectors", "7x7"])  # fmt: skip
def test_propagate_runs_all_steps_as_one_node_equal_to_step_by_step(variant, k, shape):
    """One FusedPropagation node for the T steps: every output and every leaf gradient equal the
    step-by-step graph, with gradients reaching an intermediate step as well as the last."""
    _, h0, aff, att = _leaves(k, shape, torch.float64)
    leaves = [h0, aff, att]
    gen = torch.Generator().manual_seed(3)
    g_last, g_mid = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))

    h, steps = propagate(h0, _step_weights(variant, k, aff, att), k, return_steps=True)
    assert type(h.grad_fn).__name__ == "FusedPropagationBackward"
    want = _step_by_step(h0, _step_weights(variant, k, aff, att), k)
    assert type(want[-1].grad_fn).__name__ == "FusedCPUStepBackward"
    for got_h, want_h in zip(steps[1:], want):
        torch.testing.assert_close(got_h, want_h, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((h * g_last).sum() + (steps[2] * g_mid).sum(), leaves, allow_unused=True)
    ref = torch.autograd.grad((want[-1] * g_last).sum() + (want[1] * g_mid).sum(), leaves, allow_unused=True)
    for name, a, b in zip(("h0", "affinity", "attention"), got, ref):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("items, calls", [(1, [1] * 5), (2, [2, 2, 1]), (9, [5])], ids=["one", "two", "all"])
@pytest.mark.parametrize("variant", ["cspn-h0", "cspn-ht", "dyspn-factored"])
@pytest.mark.parametrize("k", [3, 7])
def test_steps_item_by_item_equal_the_whole_batch_at_once(k, variant, items, calls, monkeypatch):
    """The CPU kernels run the T steps one batch item (or group of items) at a time, forward and
    backward: outputs, every leaf's gradient (h0's with and without an anchor term) and the no-grad path
    are bitwise those of running each step on the whole batch, with groups that do not divide the batch
    (5 items in groups of 2: 2 + 2 + 1)."""
    from spntune.models import fused_propagation

    shape = (5, 3, 9, 21)
    sizes: list[int] = []
    forward_step = cpu_propagation.forward_step

    def spy(h, *args, **kwargs):
        sizes.append(h.shape[0])
        return forward_step(h, *args, **kwargs)

    monkeypatch.setattr(cpu_propagation, "forward_step", spy)

    def run(item_major: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu_propagation, "item_major", item_major)
        _, h0, aff, att = _leaves(k, shape, torch.float64)
        leaves = [h0, aff, att]
        weights = _step_weights(variant, k, aff, att)
        # a group holds as many items as keep one step's h, h0, output and weights under _GROUP_BYTES
        per_item = sum(t[0].numel() * 8 for t in (h0, h0, h0, *weights[0]) if t is not None)
        monkeypatch.setattr(fused_propagation, "_GROUP_BYTES", items * per_item)
        sizes.clear()
        h, steps = propagate(h0, weights, k, return_steps=True)
        assert sizes == ([n for n in calls for _ in weights] if item_major else [5] * len(weights))
        grads = torch.autograd.grad((h.square()).sum() + steps[1].sum(), leaves, allow_unused=True)
        with torch.no_grad():
            plain = propagate(h0, _step_weights(variant, k, aff, att), k)[0]
        return [*steps[1:], plain, *(g for g in grads if g is not None)]

    got, want = run(True), run(False)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("frozen", ["h0", "affinity", "attention"])
@pytest.mark.parametrize("shape, dtype", [((1, 3, 6, 5), torch.float64), ((2, 5, 9, 23), torch.float32)],
                         ids=["narrow-rows-float64", "float32"])  # fmt: skip
def test_one_node_with_frozen_inputs_narrow_rows_and_float32(shape, dtype, frozen):
    """Rows narrower than a vector (the scalar path) and float32, with one input not requiring grad."""
    k = 3
    _, h0, aff, att = _leaves(k, shape, dtype)
    leaves = {"h0": h0, "affinity": aff, "attention": att}
    leaves[frozen].requires_grad_(False)
    wanted = [t for t in leaves.values() if t.requires_grad]
    h, _ = propagate(h0, _step_weights("dyspn-factored", k, aff, att), k)
    assert type(h.grad_fn).__name__ == "FusedPropagationBackward"
    got = torch.autograd.grad(h.pow(2).sum(), wanted)
    want = torch.autograd.grad(_step_by_step(h0, _step_weights("dyspn-factored", k, aff, att), k)[-1].pow(2).sum(),
                               wanted)  # fmt: skip
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_one_step_as_one_node_and_no_steps():
    k = 3
    _, h0, aff, att = _leaves(k, (2, 3, 7, 20), torch.float64)
    w = dyspn_factored_weights(aff, att, k)
    h, steps = propagate(h0, [w], k, return_steps=True)
    assert type(h.grad_fn).__name__ == "FusedPropagationBackward" and len(steps) == 2
    want = propagate_step(h0, h0, *w[:3], k, w[3])
    torch.testing.assert_close(h, want, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(h.sum(), [h0, aff, att], retain_graph=True),
                    torch.autograd.grad(want.sum(), [h0, aff, att])):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert propagate(h0, [], k)[0] is h0


def test_a_loss_on_an_early_step_only_skips_the_later_steps():
    k = 5
    _, h0, aff, att = _leaves(k, (1, 4, 8, 19), torch.float64)
    _, steps = propagate(h0, _step_weights("dyspn-factored", k, aff, att), k, return_steps=True)
    got = torch.autograd.grad(steps[1].sum(), [h0, aff, att])
    want = torch.autograd.grad(_step_by_step(h0, _step_weights("dyspn-factored", k, aff, att), k)[0].sum(),
                               [h0, aff, att])  # fmt: skip
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_propagate_steps_one_by_one_when_the_neighbour_weights_differ(monkeypatch):
    k = 3
    _, h0, aff, _ = _leaves(k, (1, 2, 6, 17), torch.float64)
    weights = [cspn_weights(aff), cspn_weights(aff * 2.0)]
    h, _ = propagate(h0, weights, k)
    assert type(h.grad_fn).__name__ == "FusedCPUStepBackward"
    torch.testing.assert_close(h, _step_by_step(h0, weights, k)[-1])
    calls = []
    real = cpu_propagation.propagate_cpu
    monkeypatch.setattr(cpu_propagation, "propagate_cpu", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():  # without autograd the steps run through propagate_cpu too: the same values
        shared = _step_weights("cspn-h0", k, aff, aff)
        torch.testing.assert_close(propagate(h0, shared, k)[0], _step_by_step(h0, shared, k)[-1], rtol=0, atol=0)
    assert calls == [1]


def test_results_are_bitwise_equal_for_any_thread_count():
    """Every output element is computed by one thread in a fixed order: no atomics, no reductions."""
    k = 5
    results = []
    before = torch.get_num_threads()
    h, h0, aff, att = (t.detach() for t in _leaves(k, (2, 6, 13, 37), torch.float32))
    inputs = (h, h0, *dyspn_weights(aff, att, k))  # once: torch's own ops may sum in another order per thread count
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = propagate_step(*leaves, k)
            grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).view_as(out))
            results.append([out.detach(), *grads])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert [torch.equal(a, b) for a, b in zip(results[0], other)] == [True] * 6


def test_non_contiguous_inputs():
    k = 3
    h, h0, aff, att = (t.detach() for t in _leaves(k, (2, 4, 10, 24), torch.float64))
    h = h.to(memory_format=torch.channels_last)
    h0 = h0[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    aff = torch.cat([aff, aff], dim=3)[..., :24]  # a slice
    w = dyspn_weights(aff, att, k)
    torch.testing.assert_close(propagate_step(h, h0, *w, k), propagate_step_reference(h, h0, *w, k))


def test_auto_picks_the_kernels_on_cpu_and_falls_back_for_other_dtypes():
    k = 3
    h, h0, aff, _ = _leaves(k, (1, 2, 6, 7), torch.float32)
    set_propagation_backend("auto")
    assert type(propagate_step(h, h0, *cspn_weights(aff), k).grad_fn).__name__ == "FusedCPUStepBackward"
    set_propagation_backend("torch")
    assert type(propagate_step(h, h0, *cspn_weights(aff), k).grad_fn).__name__ == "_PropagateStepBackward"
    half = [t.detach().bfloat16() for t in (h, h0, aff)]
    w = cspn_weights(half[2])
    set_propagation_backend("auto")  # bfloat16: the shifted-slice path, within bfloat16's rounding of float32
    out = propagate_step(half[0], half[1], *w, k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), propagate_step(h, h0, *cspn_weights(aff), k), atol=0.05, rtol=0.02)
    set_propagation_backend("cpp")
    with pytest.raises(RuntimeError, match=r"SPNTUNE_PROPAGATION=cpp, but it takes CPU float32 / float64.*bfloat16"):
        propagate_step(half[0], half[1], *w, k)


def test_the_environment_variable_chooses_the_backend(monkeypatch):
    k = 3
    h, h0, aff, _ = _leaves(k, (1, 2, 6, 7), torch.float32)
    set_propagation_backend(None)
    monkeypatch.setenv("SPNTUNE_PROPAGATION", "torch")
    assert type(propagate_step(h, h0, *cspn_weights(aff), k).grad_fn).__name__ == "_PropagateStepBackward"
    monkeypatch.setenv("SPNTUNE_PROPAGATION", "cpp")
    assert type(propagate_step(h, h0, *cspn_weights(aff), k).grad_fn).__name__ == "FusedCPUStepBackward"


def test_a_built_library_is_reused(tmp_path):
    # A real compile of the real source, at -O0 (the last -O wins): the same steps as the session's -O3
    # build (temp file, atomic rename, lock) in 3 s instead of 25-30 s; the -O3 library the other tests load
    # is built through the same function.
    first = cpu_propagation.build_library(tmp_path, defines=("-O0",))
    assert ctypes.CDLL(str(first)).spn_forward_f32  # a loadable library with the kernels' entry points
    stamp = first.stat().st_mtime_ns
    assert cpu_propagation.build_library(tmp_path, defines=("-O0",)) == first
    assert first.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, f"{first.stem}.lock"])  # no temp files


_PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from spntune.models import cpu_propagation
    from spntune.models.propagation import cspn_weights, propagate_step, propagate_step_reference
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = cpu_propagation.library()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 3, 8, 20, generator=g)
    w = cspn_weights(torch.randn(1, 8, 8, 20, generator=g))
    ok = torch.allclose(propagate_step(h, h, *w, 3), propagate_step_reference(h, h, *w, 3), atol=1e-5)
    print(json.dumps({"built": lib is not None, "ok": ok, "warnings": [str(w.message) for w in caught],
                      "dir": str(cpu_propagation.kernel_cache_dir())}))
    """
)


def _probe(env_changes: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path), "SPNTUNE_PROPAGATION": "auto", **env_changes}
    return subprocess.Popen([sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_without_a_compiler_propagation_still_runs_with_one_warning(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"PATH": str(empty), "CXX": "", "SPNTUNE_KERNEL_CACHE": str(tmp_path / "cache")}
    r = _result(_probe(env, tmp_path))
    assert not r["built"] and r["ok"]
    assert len(r["warnings"]) == 1 and "no C++ compiler found" in r["warnings"][0]
    assert "shifted-slice" in r["warnings"][0]


def test_a_failing_compiler_is_reported_and_leaves_nothing_behind(tmp_path):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'broken-cxx: internal error' >&2\nexit 3\n")
    broken.chmod(0o755)
    cache = tmp_path / "cache"
    r = _result(_probe({"CXX": str(broken), "SPNTUNE_KERNEL_CACHE": str(cache)}, tmp_path))
    assert not r["built"] and r["ok"]
    assert "broken-cxx failed (exit 3): broken-cxx: internal error" in r["warnings"][0]
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no library, no temp file


def test_concurrent_builders_build_once_and_all_load_the_library(tmp_path):
    # A compiler that counts its builds and, after a pause that keeps the other process waiting on the lock,
    # writes this session's already built library (test_a_built_library_is_reused compiles for real, at -O0; the
    # 20-40 s of a real -O3 build test no more here). --version goes to the system compiler: the library's
    # name is keyed by it.
    prebuilt = cpu_propagation.build_library()
    counting = tmp_path / "cxx"
    counting.write_text(
        "#!/bin/sh\n"
        'out=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
        f'if [ -n "$out" ]; then echo build >> {tmp_path / "builds"}; sleep 2; cp {prebuilt} "$out"; exit 0; fi\n'
        f'exec {shutil.which("g++") or shutil.which("c++")} "$@"\n'
    )
    counting.chmod(0o755)
    cache = tmp_path / "cache"
    procs = [_probe({"SPNTUNE_KERNEL_CACHE": str(cache), "CXX": str(counting)}, tmp_path) for _ in range(2)]
    results = [_result(p) for p in procs]
    assert all(r["built"] and r["ok"] and not r["warnings"] for r in results)
    assert (tmp_path / "builds").read_text().split() == ["build"]  # one compile; the other process waited
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock", ".so"]  # one library, no temp files


def test_an_unwritable_cache_folder_falls_back_to_the_temp_folder(tmp_path, monkeypatch):
    built = cpu_propagation.build_library()  # this session's library, placed where the fallback looks
    fallback = tmp_path / f"spntune-kernels-{os.getuid()}"
    fallback.mkdir()
    shutil.copy2(built, fallback / built.name)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SPNTUNE_KERNEL_CACHE", str(blocker / "kernels"))  # mkdir fails: a file is in the way
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cpu_propagation.build_library() == fallback / built.name


def test_no_writable_folder_at_all_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SPNTUNE_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    with pytest.raises(cpu_propagation.KernelBuildError, match="cannot write .*not-a-folder/tmp/spntune-kernels"):
        cpu_propagation.build_library()


def test_factored_dyspn_weights_equal_the_materialised_ones():
    k = 7
    h, h0, aff, att = (t.detach() for t in _leaves(k, (2, 5, 11, 23), torch.float64))
    factored = propagate_step(h, h0, *dyspn_factored_weights(aff, att, k)[:3], k,
                              ring_scale=dyspn_factored_weights(aff, att, k)[3])  # fmt: skip
    set_propagation_backend("torch")
    materialised = propagate_step(h, h0, *dyspn_weights(aff, att, k), k)
    torch.testing.assert_close(factored, materialised, rtol=1e-12, atol=1e-12)


def test_ring_scale_of_the_wrong_shape_is_refused():
    k = 5
    h, h0, aff, att = (t.detach() for t in _leaves(k, (1, 2, 6, 7), torch.float32))
    nw, sw, aw, rs = dyspn_factored_weights(aff, att, k)
    with pytest.raises(ValueError, match=r"ring_scale must be \(1, 2, 6, 7\) for kernel_size=5"):
        propagate_step(h, h0, nw, sw, aw, k, ring_scale=rs[:, :1])


def test_the_group_budget_is_half_the_last_level_cache(tmp_path, monkeypatch):
    def cache(name: str, level: str, size: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(level + "\n")
        (tmp_path / name / "size").write_text(size + "\n")

    assert cpu_propagation.last_level_cache_bytes(tmp_path) is None  # nothing to read
    for name, level, size in (("index0", "1", "32K"), ("index1", "1", "32K"), ("index2", "2", "1024K"),
                              ("index3", "3", "32768K"), ("index4", "x", "1M")):  # fmt: skip
        cache(name, level, size)
    assert cpu_propagation.last_level_cache_bytes(tmp_path) == 32 << 20  # the highest level; bad entries skipped
    (tmp_path / "index3" / "size").write_text("8M\n")
    assert cpu_propagation.last_level_cache_bytes(tmp_path) == 8 << 20
    # group_bytes reads this machine's caches once; group_size uses it unless a test fixes _GROUP_BYTES
    from spntune.models import fused_propagation

    try:
        cpu_propagation._machine_cache_bytes.cache_clear()
        monkeypatch.setattr(cpu_propagation, "last_level_cache_bytes", lambda: 8 << 20)
        monkeypatch.setattr(cpu_propagation, "usable_cpus", lambda: 2)
        assert cpu_propagation.group_bytes() == 4 << 20
        h0 = torch.zeros(8, 11, 64, 64)  # 180 KB per item's map (h, h0 and the output count)
        nw = torch.zeros(8, 48, 64, 64)  # 786 KB of 7x7 weights per item
        assert fused_propagation.group_size(cpu_propagation, h0, nw, [None, None, None]) == 3  # 4 MB // 1.33 MB
        cpu_propagation._machine_cache_bytes.cache_clear()
        monkeypatch.setattr(cpu_propagation, "last_level_cache_bytes", lambda: None)
        assert cpu_propagation.group_bytes() == 16 << 20  # unknown: the default
        # a server's L3 seen from a VM with 2 CPUs (480 MB in sysfs): at most 16 MB per usable CPU is counted
        # for the prefetch choice, 32 MB for the groups
        cpu_propagation._machine_cache_bytes.cache_clear()
        monkeypatch.setattr(cpu_propagation, "last_level_cache_bytes", lambda: 480 << 20)
        monkeypatch.setattr(cpu_propagation, "usable_cpus", lambda: 2)
        assert (cpu_propagation.cache_bytes(), cpu_propagation.group_bytes()) == (32 << 20, 32 << 20)
        cpu_propagation._machine_cache_bytes.cache_clear()
        monkeypatch.setattr(cpu_propagation, "last_level_cache_bytes", lambda: 32 << 20)  # the EPYC VM: its L3
        assert (cpu_propagation.cache_bytes(), cpu_propagation.group_bytes()) == (32 << 20, 16 << 20)
        monkeypatch.setattr(cpu_propagation, "last_level_cache_bytes", lambda: 480 << 20)
        cpu_propagation._machine_cache_bytes.cache_clear()
        monkeypatch.setattr(cpu_propagation, "usable_cpus", lambda: 64)  # the whole socket: all of it
        assert (cpu_propagation.cache_bytes(), cpu_propagation.group_bytes()) == (480 << 20, 240 << 20)
    finally:
        cpu_propagation._machine_cache_bytes.cache_clear()  # the next call reads this machine's caches again
