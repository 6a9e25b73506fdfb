"""Bad input to trial configs, ``--set`` and search spaces is refused at load, naming the file, key or value,
before Ray starts or anything heavy is imported (each case here once passed validation and failed later)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from spntune.config import (
    SEARCH_SMOKE_OVERRIDES,
    ConfigError,
    TrialConfig,
    layer_config,
    load_yaml,
    parse_set_args,
)
from spntune.space import BUILTIN_SPACES, Param, SearchSpace, load_space


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def space_of(tmp_path: Path, space: dict) -> SearchSpace:
    return load_space(write(tmp_path, yaml.safe_dump(space)))


# ----------------------------------------------------------------- seed points (points_to_evaluate)

SEEDED = {
    "params": {
        "model.arch": {"choice": ["unet", "fpn"]},
        "optim.lr": {"float": [0.001, 0.01]},
        "train.amp": {"choice": [True, False]},
        "refiner.iterations": {"int": [2, 8], "step": 2},
        "train.epochs": {"value": 2},
    }
}


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ({"model.arch": "linknet"}, r"points_to_evaluate\[0\]: model.arch: 'linknet' is not one of its choices "
                                    r"\['unet', 'fpn'\]"),
        ({"optim.lr": 0.5}, r"points_to_evaluate\[0\]: optim.lr: 0.5 is outside its range \[0.001, 0.01\]"),
        ({"optim.lr": "fast"}, r"optim.lr: 'fast' is not a finite number"),
        ({"refiner.iterations": 3}, r"refiner.iterations: 3 is not on its grid of step 2 from 2"),
        ({"refiner.iterations": 10}, r"refiner.iterations: 10 is outside its range \[2, 8\]"),
        ({"refiner.iterations": 4.5}, r"refiner.iterations: 4.5 is not an integer"),
        ({"train.amp": 1}, r"train.amp: 1 is not one of its choices \[True, False\]"),
        ({"train.epochs": 3}, r"train.epochs: 3 differs from its fixed value 2"),
    ],
)  # fmt: skip
def test_seed_points_outside_the_space_are_refused(tmp_path, point, expected):
    """Optuna takes a seed point as it is: an unknown option stopped the search driver mid-run
    ("ValueError: 'linknet' not in ('unet', 'fpn')"), an out-of-range number was trained."""
    with pytest.raises(ConfigError, match=expected):
        space_of(tmp_path, {**SEEDED, "points_to_evaluate": [point]})


def test_seed_points_inside_the_space_pass(tmp_path):
    space = space_of(
        tmp_path,
        {**SEEDED, "points_to_evaluate": [{"model.arch": "fpn", "optim.lr": 0.01, "train.amp": False,
                                           "refiner.iterations": 6, "train.epochs": 2}]}
    )  # fmt: skip
    assert len(space.points_to_evaluate) == 1


# ----------------------------------------------------------------- encoders


@pytest.mark.parametrize("key", ["model.encoder", "refiner.affinity_encoder"])
def test_unknown_encoders_are_refused_at_validation(key):
    with pytest.raises(ConfigError, match=rf"{key}: unknown encoder 'nosuch'; valid: resnet18, .*'tu-<timm model>'"):
        TrialConfig.from_dict({key: "nosuch"})
    with pytest.raises(ConfigError, match=r"unknown encoder 'resnet19' \(did you mean 'resnet18'"):
        TrialConfig.from_dict({key: "resnet19"})


def test_a_space_searching_an_unknown_encoder_is_refused(tmp_path):
    space = {"params": {"model.encoder": {"choice": ["resnet18", "nosuchencoder"]}}}
    with pytest.raises(ConfigError, match=r"params model.encoder: value 'nosuchencoder' is invalid: .*unknown encoder"):
        space_of(tmp_path, space)


def test_encoder_names_agree_with_smp_and_timm():
    """ENCODERS is smp's registry, held without importing it; tu- names are checked against timm."""
    import segmentation_models_pytorch as smp

    from spntune.names import ENCODERS

    assert sorted(ENCODERS) == sorted(smp.encoders.get_encoder_names())
    assert TrialConfig.from_dict({"model.encoder": "tu-resnet18"}).model.encoder == "tu-resnet18"
    with pytest.raises(ConfigError, match=r"model.encoder: unknown encoder 'tu-nosuch': timm has no model 'nosuch'"):
        TrialConfig.from_dict({"model.encoder": "tu-nosuch"})


def test_model_kwargs_agree_with_the_architectures_and_a_typo_is_refused():
    """ARCHITECTURE_KWARGS is each constructor's own keywords (and the deprecated ones smp pops from its
    **kwargs), less those spntune sets: a key smp would hand to one of its own encoders, which drop it
    unread, is refused naming the keys there are; a timm encoder takes more."""
    import inspect
    import re

    import segmentation_models_pytorch as smp
    import torch

    from spntune.models.coarse import FCN, build_coarse, feature_channels
    from spntune.names import ARCHITECTURE_KWARGS, ARCHITECTURES, MODEL_KWARGS_TAKEN

    assert sorted(ARCHITECTURE_KWARGS) == sorted(ARCHITECTURES)
    for arch in ARCHITECTURES:
        cls = FCN if arch == "fcn" else smp.MODEL_ARCHITECTURES_MAPPING[arch]
        params = inspect.signature(cls.__init__).parameters
        named = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
        popped = set(re.findall(r"kwargs\.pop\(\s*[\"'](\w+)[\"']", inspect.getsource(cls.__init__)))
        strides = {"output_stride"} if "output_stride" in ARCHITECTURE_KWARGS[arch] else set()
        assert set(ARCHITECTURE_KWARGS[arch]) == (named | popped | strides) - set(MODEL_KWARGS_TAKEN), arch
        # output_stride goes to smp's get_encoder: listed where the decoder follows it, and only there
        if arch not in ("fcn", "dpt") and "encoder_output_stride" not in named:
            try:
                with torch.no_grad():
                    out = build_coarse(arch, "resnet18", None, 2, output_stride=16).eval()(torch.zeros(1, 3, 64, 64))
                works = out.shape == (1, 2, 64, 64)
            except RuntimeError:  # a decoder that needs every stride: tensor sizes do not match
                works = False
            assert works == bool(strides), arch
    with pytest.raises(ConfigError, match=r"model.kwargs.decoder_channel: unet takes no such keyword \(did you "
                       r"mean 'decoder_channels'.*it takes encoder_depth, "):  # fmt: skip
        TrialConfig.from_dict({"model.kwargs": {"decoder_channel": [8, 8, 8, 8, 8]}})
    with pytest.raises(ConfigError, match=r"model.kwargs.output_stride: deeplabv3 sets it from encoder_output_stride"):
        TrialConfig.from_dict({"model.arch": "deeplabv3", "model.encoder": "tu-hf-hub:o/m",
                               "model.kwargs": {"output_stride": 16}})  # fmt: skip
    assert TrialConfig.from_dict({"model.kwargs": {"output_stride": 16}}).model.kwargs == {"output_stride": 16}
    with pytest.raises(ConfigError, match=r"model.kwargs.activation: not settable here \(the losses and metrics"):
        TrialConfig.from_dict({"model.kwargs": {"activation": "softmax"}})
    with pytest.raises(ConfigError, match=r"model.kwargs.varant: fcn takes no such keyword \(did you mean 'variant'"):
        TrialConfig.from_dict({"model.arch": "fcn", "model.kwargs": {"varant": "16s"}})
    ok = {"model.kwargs": {"decoder_channels": [64, 32, 16, 16, 8], "decoder_use_batchnorm": True}}
    model = TrialConfig.from_dict(ok).model
    coarse = build_coarse(model.arch, model.encoder, None, 3, **model.kwargs)  # what a trial builds
    assert feature_channels(coarse) == 8
    # a timm encoder takes keywords of its own (hf-hub: checked when the trial builds it, no timm import here)
    timm = {"model.encoder": "tu-hf-hub:org/model", "model.kwargs": {"drop_path_rate": 0.1}}
    assert TrialConfig.from_dict(timm).model.kwargs == {"drop_path_rate": 0.1}


def test_validation_imports_no_torch_and_refuses_at_once(tmp_path):
    """Configs and spaces are validated before torch is imported (seconds): a bad encoder is refused without
    it, and no valid built-in space or config imports torch, smp or timm either (no timing asserted: shared
    machines are noisy; the imports are what makes a refusal slow)."""
    code = textwrap.dedent("""
        import sys
        from spntune.config import ConfigError, TrialConfig, layer_config
        from spntune.space import BUILTIN_SPACES, load_space
        for name in BUILTIN_SPACES:
            load_space(name)
        TrialConfig.from_dict(layer_config(None, ["refiner.affinity_encoder=resnet34"], smoke=True))
        try:
            TrialConfig.from_dict(layer_config(None, ["model.encoder=nope"], smoke=True))
        except ConfigError:
            print("refused")
        heavy = sorted(m for m in ("torch", "timm", "segmentation_models_pytorch", "ray", "optuna") if m in sys.modules)
        print("heavy:", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "heavy: []" in out, out
    assert "refused" in out, out


# ----------------------------------------------------------------- --set against the space


def test_set_conflicting_with_the_space_is_refused_naming_both():
    """--set refiner.kind=none: Optuna still suggests cspn and its refiner.channels, which none does not take."""
    space = load_space("smoke")
    with pytest.raises(ConfigError) as info:
        space.check_overrides({**SEARCH_SMOKE_OVERRIDES, "refiner.kind": "none"})
    message = str(info.value)
    assert message.startswith("--set refiner.kind=none conflicts with search space 'smoke' (the space searches "
                              "refiner.kind:"), message  # fmt: skip
    assert "params refiner.channels: value 8 is invalid when refiner.kind=cspn: refiner.channels: not a setting " \
           "of refiner.kind=none" in message  # fmt: skip
    assert "data.image_size" not in message  # the smoke overrides are not blamed


def test_set_that_breaks_the_base_names_the_settings():
    with pytest.raises(ConfigError, match=r"--set model.arch=deeplabv3, --set train.batch_size=1 conflict with .*\n"
                                          r"  base: <config>: train.batch_size must be >= 2"):  # fmt: skip
        load_space("smoke").check_overrides({"model.arch": "deeplabv3", "train.batch_size": 1})


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_builtin_spaces_take_the_smoke_overrides(name):
    space = load_space(name)
    space.check_overrides(SEARCH_SMOKE_OVERRIDES)
    space.check_overrides({})
    space.check_overrides({"train.loss": "ce", "optim.lr": 0.01})  # a searched key may be fixed by --set


# ----------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.seed", -1, r"train.seed: Input should be greater than or equal to 0"),
        ("train.seed", 99999999999999999999, r"train.seed: Input should be less than 4294967296"),
        ("train.memory_limit_gb", float("inf"), r"train.memory_limit_gb: Input should be a finite number"),
        ("train.memory_limit_gb", 1e30, r"train.memory_limit_gb: Input should be less than or equal to"),
        ("optim.weight_decay", float("inf"), r"optim.weight_decay: Input should be a finite number"),
        ("optim.lr", float("nan"), r"optim.lr: Input should be a finite number"),
        ("train.coarse_loss_weight", float("inf"), r"train.coarse_loss_weight: Input should be a finite number"),
        ("optim.momentum", float("-inf"), r"optim.momentum: Input should be a finite number"),
        ("optim.grad_clip", float("inf"), r"optim.grad_clip: must be a finite number > 0; null turns clipping off"),
    ],
)
def test_numbers_a_trial_cannot_use_are_refused(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        TrialConfig.from_dict({key: value})


def test_numbers_a_trial_can_use_pass():
    cfg = TrialConfig.from_dict({"train.seed": 2**32 - 1, "optim.grad_clip": None, "train.memory_limit_gb": 1.5})
    assert cfg.train.seed == 2**32 - 1 and cfg.optim.grad_clip is None


def test_set_parses_yaml_infinities_that_are_then_refused():
    with pytest.raises(ConfigError, match="optim.weight_decay: Input should be a finite number"):
        TrialConfig.from_dict(layer_config(None, ["optim.weight_decay=.inf"], smoke=False))


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ({"optim.weight_decay": {"float": [0.0, float("inf")]}},
         r"params.optim.weight_decay.float.high: Input should be a finite number \(got inf\)"),
        ({"optim.lr": {"float": [float("nan"), 0.1]}}, r"params.optim.lr.float.low: Input should be a finite number"),
        ({"refiner.iterations": {"int": [2, 6], "step": float("inf")}},
         r"params.refiner.iterations.step: Input should be a finite number"),
        ({"refiner.iterations": {"int": [2, 6], "step": 0.5}},
         r"params.refiner.iterations: step of an int range must be a whole number, got 0.5"),
    ],
)  # fmt: skip
def test_space_bounds_and_steps_must_be_usable(tmp_path, param, expected):
    with pytest.raises(ConfigError, match=expected):
        load_space(write(tmp_path, yaml.safe_dump({"params": param})))


def test_huge_int_ranges_are_counted_not_listed(tmp_path):
    """train.epochs: {int: [1, 100000000000]} built the whole range (MemoryError)."""
    space = space_of(tmp_path, {"params": {"train.epochs": {"int": [1, 100_000_000_000]}}})
    assert space.params["train.epochs"].candidates() == [1, 100_000_000_000]
    assert Param.model_validate({"int": [1, 1000], "step": 7}).candidates() == [1, 995]  # the last on the grid
    assert Param.model_validate({"int": [2, 6], "step": 2.0}).candidates() == [2, 4, 6]


# ----------------------------------------------------------------- files and --set text


@pytest.mark.parametrize("what", ["config", "space"])
def test_files_that_are_not_utf8_name_the_file(tmp_path, what):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfen\x00a\x00m\x00e\x00")
    load = load_yaml if what == "config" else load_space
    label = "config file" if what == "config" else "search space"
    with pytest.raises(ConfigError, match=rf"{label} {path} is not UTF-8 text \(byte 0xff at offset 0; it looks "
                                          r"like UTF-16\): save it as UTF-8 YAML"):  # fmt: skip
        load(path)


def test_a_utf8_bom_is_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufefftrain:\n  epochs: 2\n".encode())
    assert load_yaml(path) == {"train": {"epochs": 2}}


def test_set_values_that_are_not_yaml_name_the_argument():
    with pytest.raises(ConfigError, match=r"--set 'train.epochs=\[1': the value is not valid YAML \(.*expected ','"):
        parse_set_args(["train.epochs=[1"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_set_args([" =3"])


def test_empty_paths_are_refused():
    """An unset $CFG gave `--config ''`, which trained the defaults without a word."""
    with pytest.raises(ConfigError, match=r"--config: empty path"):
        layer_config("", [], smoke=True)
    with pytest.raises(ConfigError, match=r"--space: empty path"):
        load_space("")
    with pytest.raises(ConfigError, match=r"config file: empty path"):
        load_yaml("")


@pytest.mark.parametrize("what", ["config", "space"])
def test_duplicate_keys_are_refused_naming_the_line(tmp_path, what):
    text = "train:\n  epochs: 1\nname: x\ntrain:\n  epochs: 2\n"
    path = write(tmp_path, text)
    load = load_yaml if what == "config" else load_space
    with pytest.raises(ConfigError, match=rf"{path}:4:1: not valid YAML: .*key 'train' twice \(first on line 1\)"):
        load(path)
    nested = write(tmp_path, "params:\n  optim.lr: {float: [0.1, 0.2], float: [0.1, 0.3]}\n", "nested.yaml")
    with pytest.raises(ConfigError, match=r"nested.yaml:2:33: .*key 'float' twice"):
        load(nested)


def test_yaml_merge_keys_still_override(tmp_path):
    text = "base: &b {epochs: 1, batch_size: 2}\ntrain:\n  <<: *b\n  epochs: 3\n"
    assert load_yaml(write(tmp_path, text))["train"] == {"epochs": 3, "batch_size": 2}


# ----------------------------------------------------------------- space details


def test_a_space_metric_is_checked_naming_the_file(tmp_path):
    path = write(tmp_path, "metric: nosuch\n")
    with pytest.raises(ConfigError, match=rf"invalid search space {path}:\n  metric: 'nosuch' is not a metric "
                                          r"trials report; valid: coarse_miou"):  # fmt: skip
        load_space(path)
    assert load_space(write(tmp_path, "metric: final_refined_iou_cat\nmode: max\n")).metric == "final_refined_iou_cat"


def test_when_branches_may_be_keyed_by_numbers_and_bools(tmp_path):
    """YAML reads `2:` and `true:` as an int and a bool; define_by_run matches branches by str(value)."""
    path = write(tmp_path, """
        params:
          train.batch_size: {choice: [2, 4]}
          train.amp: {choice: [true, false]}
        when:
          train.batch_size:
            2: {optim.lr: {float: [0.001, 0.01]}}
          train.amp:
            true: {optim.weight_decay: {float: [0.0, 0.1]}}
    """)  # fmt: skip
    space = load_space(path)
    trial = optuna.trial.FixedTrial(
        {"train.batch_size": 2, "train.amp": True, "2.lr": 0.005, "True.weight_decay": 0.01}
    )
    space.define_by_run(trial)  # FixedTrial raises on a name it was not given
    config = space.to_trial_config(trial.params)
    assert config == {"train.batch_size": 2, "train.amp": True, "optim.lr": 0.005, "optim.weight_decay": 0.01}
    bad = write(
        tmp_path, "params:\n  train.batch_size: {choice: [2, 4]}\nwhen:\n  train.batch_size:\n    3: {}\n", "b.yaml"
    )
    with pytest.raises(ConfigError, match=r"when train.batch_size: branch '3' is not one of its values \['2', '4'\]"):
        load_space(bad)


@pytest.mark.parametrize("workers", [65, 1000, -1])
def test_loader_workers_are_bounded(workers):
    """data.num_workers=1000 started a thousand loader processes and hung the machine."""
    with pytest.raises(ConfigError, match=rf"data.num_workers: .*must be an integer in 0..64 or auto, got {workers}"):
        TrialConfig.from_dict({"data.num_workers": workers})


@pytest.mark.parametrize("name", ["timm-regnetx_002", "timm-resnest14d", "timm-mobilenetv3_large_100", "timm-gernet_s",
                                  "timm-res2net50_26w_4s", "tu-hf-hub:timm/resnet18.a1_in1k"])  # fmt: skip
def test_encoder_names_smp_renames_to_timm_are_accepted(name):
    """smp 0.6 builds these older timm- names as tu- encoders; refusing them broke configs that trained."""
    assert TrialConfig.from_dict({"model.encoder": name}).model.encoder == name
