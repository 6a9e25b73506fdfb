import pytest
import torch

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
