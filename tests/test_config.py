import pytest

from spntune.config import ConfigError, TrialConfig, flatten, parse_set_args, unflatten


def test_defaults_validate():
    cfg = TrialConfig.from_dict({})
    assert cfg.data.name == "synthetic" and cfg.refiner.kind == "cspn"


def test_flat_and_nested_agree():
    nested = TrialConfig.from_dict({"refiner": {"kind": "dyspn", "kernel_size": 7}, "train": {"epochs": 2}})
    flat = TrialConfig.from_dict({"refiner.kind": "dyspn", "refiner.kernel_size": 7, "train.epochs": 2})
    assert nested == flat
    assert unflatten(flatten(nested.to_dict())) == nested.to_dict()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"refiner.kernal_size": 3}, r"refiner.kernal_size: not a setting of refiner.kind=cspn \(its settings: "),
        (
            {"refiner.kind": "none", "refiner.kernel_size": 3},
            r"refiner.kernel_size: not a setting of refiner.kind=none",
        ),
        ({"refiner.kind": "dyspn", "refiner.centre": "ht"}, r"refiner.centre: not a setting of refiner.kind=dyspn"),
        ({"refiner.kernel_size": 4}, r"refiner.kernel_size: kernel size must be odd.*got 4"),
        ({"refiner.kind": "spn"}, r"refiner.kind: unknown refiner 'spn'; valid: \['cspn', 'dyspn', 'none'\]"),
        ({"model.arch": "segnet"}, r"model.arch: unknown coarse architecture 'segnet'; valid: .*'unet'"),
        ({"data.name": "coco"}, r"data.name: unknown dataset 'coco'; valid: .*'folder'"),
        ({"data.name": "voc"}, r"needs data.root"),
        ({"data.image_size": [100, 128]}, r"data.image_size: .*multiples of 32"),
        ({"train.loss": "ce+dise"}, r"train.loss: unknown loss 'dise'"),
        ({"optim.lr": -1}, r"optim.lr: .*greater than 0"),
        ({"refiner.iterations": 0}, r"refiner.iterations"),
        (
            {"model.arch": "deeplabv3plus", "train.batch_size": 1},
            r"batch_size must be >= 2 for model.arch='deeplabv3plus'",
        ),
    ],
)
def test_bad_values_name_the_key(config, expected):
    with pytest.raises(ConfigError, match=expected):
        TrialConfig.from_dict(config)


def test_several_errors_are_all_listed():
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict({"refiner.kernel_size": 4, "optim.lr": 0, "bogus": 1})
    text = str(info.value)
    assert "refiner.kernel_size" in text and "optim.lr" in text and "bogus: unknown key" in text


def test_set_args_parse_yaml_scalars():
    assert parse_set_args(["train.epochs=3", "model.encoder_weights=null", "data.image_size=[64, 96]"]) == {
        "train.epochs": 3,
        "model.encoder_weights": None,
        "data.image_size": [64, 96],
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["train.epochs"])


def test_image_size_int_means_square():
    assert TrialConfig.from_dict({"data.image_size": 96}).data.image_size == (96, 96)


def test_two_stage_without_refiner_is_the_coarse_phase():
    cfg = TrialConfig.from_dict({"refiner.kind": "none", "train.stage": "two_stage", "train.coarse_epochs": 2})
    assert cfg.total_epochs == 2


def test_kernel_size_error_names_the_value_once():
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict({"refiner.kernel_size": 4})
    assert str(info.value).endswith("refiner.kernel_size: kernel size must be odd (3, 5, 7, 9 or 11), got 4")


def test_every_refiner_config_builds_its_refiner():
    """A refiner's settings are its module's keyword arguments: REFINERS[kind](num_classes, **settings)."""
    from spntune.config import REFINER_CONFIGS
    from spntune.models import REFINERS

    assert set(REFINER_CONFIGS) == set(REFINERS)
    for kind in REFINER_CONFIGS:
        cfg = TrialConfig.from_dict({"refiner.kind": kind})
        assert cfg.refiner.kind == kind and type(cfg.refiner) is REFINER_CONFIGS[kind]
        REFINERS[kind](num_classes=3, **cfg.refiner.model_dump(exclude={"kind"}))
