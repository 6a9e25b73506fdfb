import pytest
import torch
from fixtures import HostReads

from spntune.losses import LOSSES, build_loss, parse_loss_spec


def test_parse_specs():
    assert parse_loss_spec("ce") == [(1.0, "ce")]
    assert parse_loss_spec("ce+dice") == [(1.0, "ce"), (1.0, "dice")]
    assert parse_loss_spec("ce + 0.5*lovasz") == [(1.0, "ce"), (0.5, "lovasz")]
    with pytest.raises(ValueError, match="unknown loss 'dise'.*valid"):
        parse_loss_spec("ce+dise")
    with pytest.raises(ValueError, match="> 0"):
        parse_loss_spec("-1*ce")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_ignores_void_pixels(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :, :3] = 255
    loss = LOSSES[name](logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad[:, :, :, :3].abs().max() == 0  # void pixels get no gradient
    changed = logits.detach().clone()
    changed[:, :, :, :3] = 100.0
    assert LOSSES[name](changed, target).item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_perfect_prediction_scores_better(name):
    target = torch.randint(0, 3, (1, 8, 8))
    good = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    bad = torch.roll(good, 1, dims=1)
    assert LOSSES[name](good, target) < LOSSES[name](bad, target)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_void_batch_is_zero(name):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = LOSSES[name](logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()


def test_composite_is_weighted_sum():
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    total = build_loss("ce+0.5*dice")(logits, target)
    expected = LOSSES["ce"](logits, target) + 0.5 * LOSSES["dice"](logits, target)
    assert total.item() == pytest.approx(expected.item())


# The losses as first written, with boolean indexing and Python branches on tensors (each a read back to the
# host on a GPU): the sync-free versions must give the same values and gradients.
def _reference_ce(logits, target):
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=255)


def _reference_soft(kind, logits, target, smooth=1.0):
    b, c = logits.shape[:2]
    probs = logits.float().softmax(dim=1).view(b, c, -1)
    valid = (target != 255).view(b, 1, -1)
    one_hot = torch.nn.functional.one_hot(target.masked_fill(target == 255, 0).view(b, -1), c).permute(0, 2, 1)
    probs, one_hot = probs * valid, one_hot.float() * valid
    inter = (probs * one_hot).sum(dim=(0, 2))
    total = probs.sum(dim=(0, 2)) + one_hot.sum(dim=(0, 2))
    score = (2 * inter + smooth) / (total + smooth) if kind == "dice" else (inter + smooth) / (total - inter + smooth)
    present = one_hot.sum(dim=(0, 2)) > 0
    return 1 - score[present].mean()


def _reference_focal(logits, target, gamma=2.0):
    valid = target != 255
    log_pt = logits.float().log_softmax(dim=1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    log_pt = log_pt[valid]
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def _reference_lovasz(logits, target):
    c = logits.shape[1]
    probs = logits.float().softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    labels = target.reshape(-1)
    probs, labels = probs[labels != 255], labels[labels != 255]
    losses = []
    for cls in range(c):
        fg = (labels == cls).float()
        if fg.sum() == 0:
            continue
        errors_sorted, perm = torch.sort((fg - probs[:, cls]).abs(), descending=True)
        gt = fg[perm]
        jaccard = 1.0 - (gt.sum() - gt.cumsum(0)) / (gt.sum() + (1 - gt).cumsum(0))
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean()


REFERENCES = {
    "ce": _reference_ce,
    "dice": lambda logits, target: _reference_soft("dice", logits, target),
    "jaccard": lambda logits, target: _reference_soft("jaccard", logits, target),
    "focal": _reference_focal,
    "lovasz": _reference_lovasz,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_their_reference_formulas(name, seed):
    """Values and gradients equal the boolean-indexing formulas, with void pixels and a class absent from
    the target (class 3 of 4)."""
    torch.manual_seed(seed)
    logits = (3 * torch.randn(2, 4, 9, 7, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 3, (2, 9, 7))
    target[torch.rand(2, 9, 7) < 0.3] = 255
    loss = LOSSES[name](logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = REFERENCES[name](ref_logits, target)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad.to(grad.dtype), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_read_nothing_back_to_the_host(name):
    """No ``.item()``, ``bool(tensor)`` or boolean indexing (``aten._local_scalar_dense``, ``aten.nonzero``):
    on a GPU each waits for the device, once per training batch."""
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :2] = 255
    with HostReads() as mode:
        LOSSES[name](logits, target).backward()
    assert mode.reads == []


def test_focal_with_gamma_below_one_has_finite_gradients_at_saturated_void_pixels():
    """Void pixels whose class-0 probability is 1: the power's derivative there is infinite for gamma < 1,
    and must not reach the gradient through the mask (0 x inf = NaN)."""
    from spntune.losses import focal

    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 200.0  # p(class 0) = 1 in float32
    logits.requires_grad_()
    target = torch.full((1, 4, 4), 1)
    target[:, :2] = 255
    focal(logits, target, gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()
