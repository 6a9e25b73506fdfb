import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spntune.models import cpu_propagation
from spntune.models.propagation import (
    cspn_weights,
    dyspn_ring_sums,
    dyspn_weights,
    neighbour_offsets,
    num_rings,
    propagate,
    propagate_step,
    propagate_step_reference,
    ring_index,
    set_propagation_backend,
)

KERNELS = [3, 5, 7, 9, 11]


@pytest.fixture(autouse=True, params=["torch", "cpp"])
def backend(request):
    """Every test twice: the shifted-slice path and the fused C++ kernels (tests/test_cpu_propagation.py
    checks the kernels' own edge cases)."""
    if request.param == "cpp" and cpu_propagation.library() is None:
        pytest.skip("no C++ compiler to build the fused CPU kernels")
    set_propagation_backend(request.param)
    yield request.param
    set_propagation_backend(None)


def _inputs(k, b=2, c=3, h=9, w=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_t = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    h0 = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    aff = torch.randn(b, k * k - 1, h, w, generator=g, dtype=dtype)
    att = torch.rand(b, num_rings(k) + 1, h, w, generator=g, dtype=dtype)
    return h_t, h0, aff, att


def _all_weights(k, aff, att):
    return {
        "cspn-h0-abs_sum": cspn_weights(aff, "h0", "abs_sum"),
        "cspn-ht-abs_sum": cspn_weights(aff, "ht", "abs_sum"),
        "cspn-h0-clamped": cspn_weights(aff, "h0", "clamped"),
        "dyspn": dyspn_weights(aff, att, k),
    }


def test_offsets_and_rings():
    assert neighbour_offsets(3) == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    rings = ring_index(7)
    assert len(rings) == 48
    assert [rings.count(r) for r in range(3)] == [8, 16, 24]  # DySPN's 7x7 rings


@pytest.mark.parametrize("k", KERNELS)
def test_fast_matches_reference(k):
    h, h0, aff, att = _inputs(k)
    for name, w in _all_weights(k, aff, att).items():
        fast = propagate_step(h, h0, *w, k)
        ref = propagate_step_reference(h, h0, *w, k)
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12, msg=name)


def test_cspn_matches_paper_equation_by_hand():
    # 3x3, one pixel in the middle of a 3x3 map: h1 = (1 - sum kh) h0 + sum kh_j h_j
    k = 3
    h = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    h0 = torch.full_like(h, 10.0)
    kappa = torch.zeros(1, 8, 3, 3, dtype=torch.float64)
    kappa[0, :, 1, 1] = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    kh = kappa[0, :, 1, 1] / 8.0  # sum |kappa| = 8
    neighbours = torch.tensor([0.0, 1, 2, 3, 5, 6, 7, 8], dtype=torch.float64)
    expected = (1 - kh.sum()) * 10.0 + (kh * neighbours).sum()
    out = propagate_step(h, h0, *cspn_weights(kappa, "h0"), k)
    assert out[0, 0, 1, 1].item() == pytest.approx(expected.item())
    # centre on h^t instead: (1 - sum kh) * h_t(centre = 4)
    out = propagate_step(h, h0, *cspn_weights(kappa, "ht"), k)
    assert out[0, 0, 1, 1].item() == pytest.approx(((1 - kh.sum()) * 4.0 + (kh * neighbours).sum()).item())


def test_dyspn_matches_paper_equation_by_hand():
    k = 5
    h, h0, aff, att = _inputs(k, b=1, c=1, h=5, w=5)
    out = propagate_step(h, h0, *dyspn_weights(aff, att, k), k)
    # explicit formula at the centre pixel (2, 2), whose 5x5 window is fully inside
    w = aff[0, :, 2, 2]
    pi = att[0, :, 2, 2]
    rings = torch.tensor(ring_index(k))
    neigh = torch.stack([h[0, 0, 2 + dy, 2 + dx] for dy, dx in neighbour_offsets(k)])
    s = torch.stack([w[rings == r].sum() for r in range(2)])
    s_abs = torch.stack([w[rings == r].abs().sum() for r in range(2)])
    s_prime = (pi[:2] * s_abs).sum() + pi[2] + 1e-6
    num = sum(pi[r] * (w[rings == r] * neigh[rings == r]).sum() for r in range(2))
    num = num + pi[2] * h[0, 0, 2, 2] + (s_prime - (pi[:2] * s).sum() - pi[2]) * h0[0, 0, 2, 2]
    assert out[0, 0, 2, 2].item() == pytest.approx((num / s_prime).item(), rel=1e-10)


@pytest.mark.parametrize("k", [3, 5])
def test_gradcheck(k):
    _h, h0, aff, att = _inputs(k, b=1, c=2, h=5, w=6)
    aff = aff.requires_grad_()
    att = att.requires_grad_()
    h0 = h0.requires_grad_()

    def cspn(h0, aff):
        out, _ = propagate(h0, [cspn_weights(aff, "h0")] * 3, k)
        return out

    def dyspn(h0, aff, att):
        out, _ = propagate(h0, [dyspn_weights(aff, att, k)] * 2, k)
        return out

    assert torch.autograd.gradcheck(cspn, (h0, aff))
    assert torch.autograd.gradcheck(dyspn, (h0, aff, att))


@pytest.mark.parametrize("k", KERNELS)
def test_zero_affinity_is_identity(k):
    _, h0, aff, att = _inputs(k)
    zero = torch.zeros_like(aff)
    for name, w in _all_weights(k, zero, att).items():
        out, steps = propagate(h0, [w] * 4, k, return_steps=True)
        torch.testing.assert_close(out, h0, msg=name)
        assert len(steps) == 5


@pytest.mark.parametrize("k", KERNELS)
def test_constant_map_stays_constant(k):
    _, _, aff, att = _inputs(k)
    const = torch.full((2, 3, 9, 10), 0.37, dtype=torch.float64)
    for name, w in _all_weights(k, aff * 5, att).items():
        out, _ = propagate(const, [w] * 6, k)
        torch.testing.assert_close(out, const, msg=name)


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t._base is None:  # views allocate nothing
                self.largest = max(self.largest, t.numel())
        return out


def test_fast_path_never_materialises_the_neighbourhood():
    k = 7
    h, h0, aff, _att = _inputs(k, b=1, c=4, h=32, w=32, dtype=torch.float32)
    w = cspn_weights(aff, "h0")
    padded_numel = 1 * 4 * (32 + 6) * (32 + 6)
    fast, ref = _LargestAllocation(), _LargestAllocation()
    with fast:
        propagate_step(h, h0, *w, k)
    with ref:
        propagate_step_reference(h, h0, *w, k)
    assert fast.largest <= padded_numel  # one padded copy of h, nothing k*k-sized
    assert ref.largest >= k * k * h.numel() - h.numel()  # the unfold really is k*k copies


def test_shape_errors_are_clear():
    h = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="neighbour_weight must be"):
        propagate_step(h, h, torch.zeros(1, 8, 4, 4), None, None, 5)
    with pytest.raises(ValueError, match="odd"):
        neighbour_offsets(4)


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("variant", ["cspn-h0", "cspn-ht", "dyspn"])
def test_custom_backward_matches_autograd_through_the_reference(k, variant):
    h0, _, aff, att = _inputs(k, b=2, c=3, h=8, w=9)
    grads = []
    for step in (propagate_step, propagate_step_reference):
        leaves = [t.clone().requires_grad_() for t in (h0, aff, att)]
        if variant == "dyspn":
            weights = dyspn_weights(leaves[1], leaves[2], k)
        else:
            weights = cspn_weights(leaves[1], variant.split("-")[1])
        h = leaves[0]
        for _ in range(3):
            h = step(h, leaves[0], *weights, k)
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum().backward()
        grads.append([t.grad for t in leaves])
    for fast, ref in zip(*grads, strict=True):
        if ref is None:
            assert fast is None
        else:
            torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["cspn", "dyspn"])
@pytest.mark.parametrize("return_steps", [False, True])
def test_checkpoint_steps_gives_equal_gradients(kind, return_steps):
    from spntune.models.refiners import REFINERS

    grads = []
    for checkpoint_steps in (False, True):
        torch.manual_seed(0)
        refiner = REFINERS[kind](num_classes=3, kernel_size=5, iterations=3, channels=8,
                                 checkpoint_steps=checkpoint_steps)  # fmt: skip
        torch.nn.init.normal_(refiner.affinity_net.head.weight, std=0.1)  # not the identity
        # float32: the refiner propagates in float32 whatever comes in
        image = torch.randn(2, 3, 12, 14, generator=torch.Generator().manual_seed(1))
        coarse = torch.randn(2, 3, 12, 14, generator=torch.Generator().manual_seed(2))
        coarse.requires_grad_()
        out = refiner(image, coarse, return_steps=return_steps)
        loss = out.logits.square().sum() + sum(s.sum() for s in out.steps)
        loss.backward()
        grads.append([coarse.grad] + [p.grad for p in refiner.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        # CSPN sums its shared weights' gradient in another order: float32 rounding only
        assert (recomputed - plain).norm() <= 1e-5 * plain.norm() + 1e-12


def test_saved_memory_grows_by_one_map_per_step():
    k = 7
    _, h0, aff, _att = _inputs(k, b=1, c=4, h=16, w=16, dtype=torch.float32)
    aff.requires_grad_()
    weights = cspn_weights(aff, "h0")

    def saved_numel(iterations: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            propagate(h0.clone().requires_grad_(), [weights] * iterations, k)
        return sum(storages.values())

    per_step = (saved_numel(6) - saved_numel(2)) / 4
    assert per_step <= h0.numel()  # h^t of each step, never k*k-sized


def _cspn_weights_by_autograd(affinity, centre, norm):
    """``cspn_weights`` written with autograd's ops (what it was before its backward was hand-written)."""
    abs_sum = affinity.abs().sum(dim=1, keepdim=True)
    kappa_hat = affinity / abs_sum.clamp_min(1e-6 if norm == "abs_sum" else 1.0)
    centre_weight = 1.0 - kappa_hat.sum(dim=1, keepdim=True)
    return (kappa_hat, None, centre_weight) if centre == "h0" else (kappa_hat, centre_weight, None)


@pytest.mark.parametrize("norm", ["abs_sum", "clamped"])
@pytest.mark.parametrize("centre", ["h0", "ht"])
@pytest.mark.parametrize("use", ["both", "neighbours", "centre"])
def test_cspn_weights_backward_equals_autograd_of_the_formula(norm, centre, use):
    """The hand-written backward of the CSPN normalisation against autograd through the plain formula, in
    float64, with an all-zero pixel, a zero affinity (abs has gradient 0 there), a pixel whose abs sum is
    exactly the clamped floor 1 (clamp_min passes no gradient at the tie) and small / large sums; and
    gradcheck where the function is smooth."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64)
    a[0, :, 0, 0] = 0.0
    a[0, 3, 2, 2] = 0.0
    a[1, :, 1, 1] = 0.125
    a[1, 0, 1, 1] = -0.125  # |.| sums to exactly 1.0 (powers of two)
    a[1, :, 3, 4] *= 1e-3
    grads = [
        torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64),
    ]
    results = []
    for fn in (cspn_weights, _cspn_weights_by_autograd):
        leaf = a.clone().requires_grad_()
        kappa, self_w, anchor = fn(leaf, centre, norm)
        centre_w = anchor if centre == "h0" else self_w
        loss = torch.zeros((), dtype=torch.float64)
        if use in ("both", "neighbours"):
            loss = loss + (kappa * grads[0]).sum()
        if use in ("both", "centre"):
            loss = loss + (centre_w * grads[1]).sum()
        loss.backward()
        results.append((kappa.detach(), centre_w.detach(), leaf.grad))
    for mine, theirs in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    smooth = a[:, :, 2:, 2:].clone().requires_grad_()  # no all-zero pixel, no tie (one zero affinity)
    assert torch.autograd.gradcheck(lambda x: [w for w in cspn_weights(x, centre, norm) if w is not None], (smooth,))


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("use", ["both", "sum", "abs_sum"])
def test_dyspn_ring_sums_equal_the_membership_einsum_with_gradients(k, use):
    """``dyspn_ring_sums`` (one neighbour at a time on the CPU, a hand-written backward) against the
    membership einsums it replaces, forward and gradient, in float64, with zero affinities (abs has
    gradient 0 at 0) and each output alone."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, k * k - 1, 5, 6, generator=g, dtype=torch.float64)
    a[0, :, 1, 1] = 0.0
    a[1, 2, 3, 3] = 0.0
    grads = [torch.randn(2, num_rings(k), 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    members = torch.tensor([[float(q == r) for q in ring_index(k)] for r in range(num_rings(k))], dtype=torch.float64)
    results = []
    for fn in (
        lambda x: dyspn_ring_sums(x, k),
        lambda x: (torch.einsum("rk,bkhw->brhw", members, x), torch.einsum("rk,bkhw->brhw", members, x.abs())),
    ):
        leaf = a.clone().requires_grad_()
        sums = fn(leaf)
        picked = {"both": (0, 1), "sum": (0,), "abs_sum": (1,)}[use]
        sum(((sums[i] * grads[i]).sum() for i in picked), torch.zeros((), dtype=torch.float64)).backward()
        results.append((*[s.detach() for s in sums], leaf.grad))
    for mine, theirs in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_dyspn_ring_sums_refuses_an_affinity_of_the_wrong_channel_count():
    with pytest.raises(ValueError, match=r"affinity must be \[B, 8, H, W\] for kernel_size=3, got \[1, 5, 4, 4\]"):
        dyspn_ring_sums(torch.zeros(1, 5, 4, 4), 3)
