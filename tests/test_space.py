from pathlib import Path

import optuna
import pytest
import yaml
from pydantic import ValidationError

from spntune.config import ConfigError, TrialConfig
from spntune.space import BUILTIN_SPACES, SearchSpace, load_space


def write_space(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


GOOD = {
    "name": "t",
    "base": {"data.image_size": [64, 64], "train.epochs": 1},
    "params": {
        "refiner.kind": {"choice": ["none", "cspn", "dyspn"]},
        "optim.lr": {"float": [1e-4, 1e-2], "log": True},
        "train.stage": {"choice": ["joint", "two_stage"]},
    },
    "when": {
        "refiner.kind": {
            "cspn": {
                "refiner.kernel_size": {"choice": [3, 5]},
                "refiner.iterations": {
                    "int": [
                        2,
                        8,
                    ],
                    "step": 2,
                },
            },
            "dyspn": {"refiner.kernel_size": {"choice": [5, 7]}},
        },
        "train.stage": {"two_stage": {"train.coarse_epochs": {"int": [1, 3]}}},
    },
    "points_to_evaluate": [
        {"refiner.kind": "cspn", "optim.lr": 1e-3, "train.stage": "joint", "cspn.kernel_size": 3, "cspn.iterations": 4}
    ],
}


@pytest.mark.parametrize("name", BUILTIN_SPACES)
def test_builtin_spaces_validate(name):
    space = load_space(name)
    assert space.metric == "refined_miou"


def test_branch_names_and_translation(tmp_path):
    space = load_space(write_space(tmp_path, GOOD))
    assert space.optuna_to_config_key() == {
        "refiner.kind": "refiner.kind", "optim.lr": "optim.lr", "train.stage": "train.stage",
        "cspn.kernel_size": "refiner.kernel_size", "cspn.iterations": "refiner.iterations",
        "dyspn.kernel_size": "refiner.kernel_size", "two_stage.coarse_epochs": "train.coarse_epochs",
    }  # fmt: skip
    trial = optuna.trial.FixedTrial(
        {
            "refiner.kind": "dyspn",
            "optim.lr": 2e-3,
            "train.stage": "two_stage",
            "dyspn.kernel_size": 7,
            "two_stage.coarse_epochs": 2,
        }
    )
    space.define_by_run(trial)  # suggests only the active branch; FixedTrial raises on any other name
    config = space.to_trial_config(trial.params)
    assert config["refiner.kernel_size"] == 7 and config["train.coarse_epochs"] == 2 and config["train.epochs"] == 1
    cfg = TrialConfig.from_dict(config)
    assert cfg.refiner.kind == "dyspn" and cfg.train.stage == "two_stage"


def test_define_by_run_only_suggests_the_active_branch(tmp_path):
    space = load_space(write_space(tmp_path, GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        space.define_by_run(trial)
        kind = trial.params["refiner.kind"]
        branch = {n for n in trial.params if n.startswith(("cspn.", "dyspn."))}
        assert all(n.startswith(kind + ".") for n in branch)
        if trial.params["train.stage"] == "joint":
            assert "two_stage.coarse_epochs" not in trial.params
        TrialConfig.from_dict(space.to_trial_config(trial.params))
        seen.add(kind)
        study.tell(trial, 0.0)
    assert seen == {"none", "cspn", "dyspn"}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"params": {"refiner.kernal_size": {"choice": [3]}}},
            r"refiner.kernal_size: value 3 is invalid: refiner.kernal_size: not a setting of refiner.kind=cspn \(its settings: affinity_encoder, affinity_net, affinity_norm",
        ),
        (
            {"params": {"refiner.kernel_size": {"choice": [3, 4]}}},
            r"refiner.kernel_size: value 4 is invalid: .*must be odd",
        ),
        ({"params": {"optim.lr": {"float": [1e-2, 1e-4]}}}, r"params.optim.lr: .*low > high"),
        ({"params": {"optim.lr": {"float": [0.0, 1e-4], "log": True}}}, r"log scale needs low > 0"),
        (
            {"params": {"model.arch": {"choice": ["unet", "segnet"]}}},
            r"model.arch: value 'segnet' is invalid: .*unknown coarse architecture",
        ),
        ({"params": {"refiner.iterations": {"int": [1, 40]}}}, r"refiner.iterations: value 33 is invalid"),
        ({"params": {"optim.lr": {"choice": [1e-3], "float": [1e-4, 1e-2]}}}, r"exactly one of"),
        (
            {"when": {"refiner.kind": {"spn": {"refiner.kernel_size": {"choice": [3]}}}}},
            r"branch 'spn' is not one of its values",
        ),
        (
            {"when": {"model.encoder": {"resnet18": {"refiner.kernel_size": {"choice": [3]}}}}},
            r"when model.encoder: not a searched parameter",
        ),
        (
            {"points_to_evaluate": [{"refiner.kind": "cspn", "cspn.kernal": 3}]},
            r"points_to_evaluate\[0\]: unknown parameters \['cspn.kernal'\]",
        ),
        ({"metrik": "x"}, r"metrik: unknown key"),
    ],
)
def test_schema_errors_name_the_key(tmp_path, patch, expected):
    space = {**GOOD, **{k: v for k, v in patch.items() if k not in ("params", "when")}}
    if "params" in patch:
        space["params"] = {**GOOD["params"], **patch["params"]}
    if "when" in patch:
        space["when"] = patch["when"]
    with pytest.raises(ConfigError, match=expected):
        load_space(write_space(tmp_path, space))


def test_missing_space_file():
    with pytest.raises(ConfigError, match="search space file not found: nope.yaml .*built-in spaces: smoke"):
        load_space("nope.yaml")


def test_a_setting_searched_for_every_refiner_kind_is_refused():
    """refiner.kind=none takes no settings: searching refiner.channels for all trials would error the
    trials without a refiner, so the space is refused with the fix named."""
    space = {"params": {"refiner.kind": {"choice": ["none", "cspn"]}, "refiner.channels": {"choice": [8, 16]}}}
    with pytest.raises(ValidationError, match=r"refiner.channels: value 8 is invalid when refiner.kind=none.*"
                       r"not a setting of refiner.kind=none.*search it under when: refiner.kind"):  # fmt: skip
        SearchSpace.model_validate(space)
    space["when"] = {"refiner.kind": {"cspn": {"refiner.channels": space["params"].pop("refiner.channels")}}}
    assert SearchSpace.model_validate(space).to_trial_config({"refiner.kind": "cspn", "cspn.channels": 16}) == {
        "refiner.kind": "cspn",
        "refiner.channels": 16,
    }


def test_branch_parameters_are_checked_under_their_branch():
    space = {"params": {"refiner.kind": {"choice": ["cspn", "dyspn"]}},
             "when": {"refiner.kind": {"dyspn": {"refiner.centre": {"choice": ["h0", "ht"]}}}}}  # fmt: skip
    with pytest.raises(ValidationError, match="refiner.centre: value 'h0' is invalid when refiner.kind=dyspn"):
        SearchSpace.model_validate(space)


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [("name: x\nparams:\n  optim.lr: {float: [1e-4, 1e-2]\n  refiner.kind: {choice: [none]}\n", ":4:3:",
      "expected ',' or '}'"),
     ("name: x\nparams:\n  optim.lr: {float: [1e-4, 1e-2]}\n   refiner.kind: x\n", ":4:4:", "expected <block end>"),
     ("params: [1, 2\n", ":2:1:", "expected ',' or ']'"),
     ("name: x\n\tparams: {}\n", ":2:1:", "'\\t' that cannot start any token")],
    ids=["unclosed-brace", "bad-indent", "unclosed-list", "tab"],
)  # fmt: skip
def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"search space {path}{where} not valid YAML: ") and problem in message, message
    (tmp_path / "config.yaml").write_text(text)  # trial configs (spntune train --config) say it the same way
    from spntune.config import load_yaml

    with pytest.raises(ConfigError, match=f"config.yaml{where} not valid YAML"):
        load_yaml(tmp_path / "config.yaml")
