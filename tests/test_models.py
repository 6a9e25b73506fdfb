import subprocess
import sys

import pytest
import torch

from spntune.models import COARSE, REFINERS, RefinedSegmenter, WeightsUnavailableError, build_coarse

CORE_ARCHS = ["unet", "deeplabv3", "deeplabv3plus", "fcn", "fpn", "pspnet"]


def test_registry_has_the_named_architectures():
    for name in [*CORE_ARCHS, "unetplusplus", "linknet", "manet"]:
        assert name in COARSE
    assert set(REFINERS) == {"none", "cspn", "dyspn"}


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_coarse_forward_backward(arch):
    torch.manual_seed(0)
    model = build_coarse(arch, "resnet18", None, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()
    # (PSPNet uses only 3 encoder stages, so not every encoder weight gets a gradient)
    with_grad = [p.grad is not None for p in model.parameters()]
    assert with_grad[-1] and sum(with_grad) > len(with_grad) / 2


@pytest.mark.parametrize("variant", ["8s", "16s", "32s"])
def test_fcn_variants(variant):
    from spntune.models import FCN

    model = FCN("resnet18", None, classes=4, variant=variant)
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 4, 64, 96)


def test_unknown_names_list_valid_ones():
    with pytest.raises(KeyError, match="valid:.*unet"):
        build_coarse("segnet", "resnet18", None, 3)
    with pytest.raises(KeyError, match="unknown encoder 'resnet1'"):
        build_coarse("unet", "resnet1", None, 3)


def test_imagenet_weights_offline_gives_a_clear_error():
    code = (
        "from spntune.models import build_coarse\n"
        "try:\n build_coarse('unet','resnet18','imagenet',3)\n"
        "except Exception as e:\n print(type(e).__name__); print(e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp/spntune-nohome"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith(WeightsUnavailableError.__name__), out.stdout + out.stderr
    assert "encoder_weights: null" in out.stdout and "HF_HUB_OFFLINE" in out.stdout


REFINER_KWARGS = {
    "none": {},
    "cspn": {"kernel_size": 3, "iterations": 3, "channels": 8},
    "cspn-ht-logits": {"kernel_size": 5, "iterations": 2, "channels": 8, "centre": "ht", "propagate": "logits"},
    "dyspn": {"kernel_size": 7, "iterations": 2, "channels": 8},
}


@pytest.mark.parametrize("name", list(REFINER_KWARGS))
def test_untrained_refiner_returns_the_coarse_prediction(name):
    torch.manual_seed(0)
    kind = name.split("-")[0]
    refiner = REFINERS[kind](num_classes=4, **REFINER_KWARGS[name])
    image = torch.randn(2, 3, 32, 32)
    coarse = torch.randn(2, 4, 32, 32) * 3
    out = refiner(image, coarse, return_steps=True)
    assert torch.equal(out.logits.argmax(1), coarse.argmax(1))
    if kind == "none" or "logits" in name:
        torch.testing.assert_close(out.logits, coarse)
    else:  # probabilities propagated: refined logits are log-probabilities of the same softmax
        torch.testing.assert_close(out.logits.softmax(1), coarse.softmax(1), atol=1e-6, rtol=1e-5)
    assert len(out.steps) == getattr(refiner, "iterations", 0) + 1


def test_dyspn_head_layout_matches_paper():
    refiner = REFINERS["dyspn"](num_classes=21, kernel_size=7, iterations=6)
    assert refiner.affinity_net.head.out_channels == 48 + 4 * 6  # 48 affinities + 4T attention


@pytest.mark.parametrize("kind", ["cspn", "dyspn"])
def test_segmenter_trains_the_refiner(kind):
    torch.manual_seed(0)
    model = RefinedSegmenter(build_coarse("unet", "resnet18", None, 3), REFINERS[kind](num_classes=3, channels=8))
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    out = model(x)
    torch.nn.functional.cross_entropy(out.refined_logits, y).backward()
    head = model.refiner.affinity_net.head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0  # zero-init head still learns


def test_registries_hold_exactly_the_names_configs_are_checked_against():
    """Configs are validated against names.py without importing torch/smp; the registries must agree."""
    from spntune import names
    from spntune.config import REFINER_CONFIGS
    from spntune.data import DATASETS
    from spntune.losses import LOSSES
    from spntune.models import COARSE, REFINERS

    assert sorted(COARSE) == sorted(names.ARCHITECTURES)  # a new smp release adding one fails here
    assert sorted(DATASETS) == sorted(names.DATASET_NAMES)
    assert sorted(LOSSES) == sorted(names.LOSS_NAMES)
    assert sorted(REFINERS) == sorted(REFINER_CONFIGS)


def test_help_and_refusals_do_not_import_torch():
    """`spntune --help` and a refused search answer at once: nothing heavy is imported on the way."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from spntune.cli import main\n"
        "rc = main(['search', '--trials', '0', '--no-mlflow'])\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'segmentation_models_pytorch') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "--trials must be an integer >= 1, got 0" in out.stderr


@pytest.mark.parametrize("arch", ["unet", "deeplabv3plus", "fcn"])
@pytest.mark.parametrize("net", ["light", "unet", "shared"])
def test_every_affinity_network_starts_as_the_identity(arch, net):
    from spntune.config import TrialConfig
    from spntune.trainables import build_model

    torch.manual_seed(0)
    for kind in ("cspn", "dyspn"):
        cfg = TrialConfig.from_dict({"model.arch": arch, "refiner.kind": kind, "refiner.affinity_net": net,
                                     "refiner.channels": 8, "refiner.kernel_size": 3, "refiner.iterations": 2})  # fmt: skip
        model = build_model(cfg, 4).eval()
        out = model(torch.randn(2, 3, 64, 64), return_steps=True)
        torch.testing.assert_close(out.refined_logits.softmax(1), out.coarse_logits.softmax(1), atol=1e-6, rtol=1e-5)
        assert type(model.refiner.affinity_net).__name__ == {
            "light": "AffinityNet", "unet": "UNetAffinityNet", "shared": "SharedAffinityNet"}[net]  # fmt: skip


def test_unet_affinity_network_has_the_bottleneck_width():
    refiner = REFINERS["cspn"](num_classes=3, channels=24, affinity_net="unet")
    assert refiner.affinity_net.head.in_channels == 24 and refiner.affinity_net.head.out_channels == 8


def test_shared_affinity_network_reads_the_coarse_decoder_features():
    """Joint training: the refined loss reaches the coarse decoder through the shared guidance; the
    guidance head learns from step one."""
    torch.manual_seed(0)
    coarse = build_coarse("unet", "resnet18", None, 3)
    refiner = REFINERS["cspn"](num_classes=3, channels=8, affinity_net="shared", feature_channels=16)
    model = RefinedSegmenter(coarse, refiner)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    out = model(x)
    torch.nn.functional.cross_entropy(out.refined_logits, y).backward()
    assert refiner.affinity_net.head.weight.grad.abs().sum() > 0
    assert refiner.affinity_net.body[0].in_channels == 16 + 3  # decoder features + probabilities
    with pytest.raises(ValueError, match="needs the coarse network's features"):
        refiner(x, out.coarse_logits.detach())


def test_guidance_head_runs_on_nchw_memory_and_matches_a_plain_convolution():
    """On a channels-last input and weight (train.channels_last) the head gives what ``nn.Conv2d`` gives, as
    NCHW memory (what the propagation reads), and the same gradients."""
    from spntune.models.refiners import GuidanceHead

    torch.manual_seed(0)
    head = GuidanceHead(6, 10).double()
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0  # the refiner starts as the identity
    torch.nn.init.normal_(head.weight)
    torch.nn.init.normal_(head.bias)
    plain = torch.nn.Conv2d(6, 10, 3, padding=1).double()
    plain.load_state_dict(head.state_dict())
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 10, 9, 11, dtype=torch.float64)
    expected_out = plain(x)
    expected_grads = torch.autograd.grad(expected_out, (x, plain.weight, plain.bias), g)
    head.to(memory_format=torch.channels_last)
    assert head.weight.is_contiguous(memory_format=torch.channels_last)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = head(xl)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected_out)
    grads = torch.autograd.grad(out, (xl, head.weight, head.bias), g)
    for mine, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs)
    assert torch.autograd.gradcheck(head, (xl,))


@pytest.mark.parametrize("guidance", [12, 4])  # more output channels than the head's 8 inputs, fewer
@pytest.mark.parametrize("net", ["light", "unet", "shared"])
def test_a_channels_last_affinity_network_matches_the_nchw_one(net, guidance):
    """train.channels_last converts every weight (the guidance head's included) to channels last: each
    affinity network still gives the NCHW network's guidance and the same gradients; as NCHW memory where its
    head widens (GuidanceHead.layout_on_nchw), else channels last."""
    from spntune.models.refiners import AffinityNet, SharedAffinityNet, UNetAffinityNet

    torch.manual_seed(0)
    make = {"light": lambda: AffinityNet(3 + 4, 8, guidance), "unet": lambda: UNetAffinityNet(3 + 4, 8, guidance),
            "shared": lambda: SharedAffinityNet(16, 4, 8, guidance)}[net]  # fmt: skip
    nets = [make().double().train(), make().double().train()]
    assert nets[0].head.layout_on_nchw == (guidance > 8)
    for p in nets[0].head.parameters():  # off the identity, so that the head's input gradients matter
        torch.nn.init.normal_(p, std=0.1)
    nets[1].load_state_dict(nets[0].state_dict())
    nets[1].to(memory_format=torch.channels_last)
    assert nets[1].head.weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    probs = torch.rand(2, 4, 64, 64, dtype=torch.float64)
    features = torch.randn(2, 16, 32, 32, dtype=torch.float64)
    g = torch.randn(2, guidance, 64, 64, dtype=torch.float64)
    outs = []
    for model, fmt in zip(nets, (torch.contiguous_format, torch.channels_last), strict=True):
        inputs = [t.contiguous(memory_format=fmt).requires_grad_() for t in (image, probs, features)]
        out = model(*inputs)
        outs.append((out, torch.autograd.grad(out, [*inputs, *model.parameters()], g, allow_unused=True)))
    assert outs[1][0].is_contiguous() == (guidance > 8)
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for mine, theirs in zip(outs[1][1], outs[0][1], strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs)
