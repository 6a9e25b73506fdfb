import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spntune.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_train_smoke_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--smoke-test",
                "--set",
                "refiner.kind=dyspn",
                "--set",
                "refiner.kernel_size=5",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "final metrics" in text and "coarse" in text and "refined" in text and "t0=" in text
    assert (out / "config.yaml").is_file()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["refiner"]["kind"] == "dyspn"
    assert sorted(p.name for p in (out / "panels").iterdir()) == [
        "legend.txt",
        "panel_000.png",
        "panel_001.png",
        "steps_000.png",
        "steps_001.png",
    ]


@pytest.mark.parametrize("name", ["synthetic", "pets", "voc", "camvid"])
def test_example_configs_validate(name):
    from spntune.config import TrialConfig, layer_config

    TrialConfig.from_dict(layer_config(str(CONFIGS / f"{name}.yaml"), [], smoke=False))


def test_shared_pets_and_voc_train_end_to_end(shared_data, tmp_path):
    for cfg, root in (("pets", "oxford-iiit-pet-mini"), ("voc", "VOCdevkit-mini")):
        args = ["train", "--config", str(CONFIGS / f"{cfg}.yaml"), "--smoke-test", "--set", f"data.root={shared_data / root}",
                "--set", "model.encoder=resnet18", "--set", "refiner.channels=8", "--set", "train.batch_size=2",
                "--output", str(tmp_path / cfg)]  # fmt: skip
        assert main(args) == 0


def test_bad_config_exits_2_with_the_key(tmp_path, capsys):
    assert main(["train", "--smoke-test", "--set", "refiner.kernel_size=4", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refiner.kernel_size: kernel size must be odd" in err and "Traceback" not in err


def test_missing_dataset_exits_2_naming_the_path(tmp_path, capsys):
    assert main(["train", "--smoke-test", "--set", "data.name=pets", "--set", f"data.root={tmp_path}/nope"]) == 2
    assert f"{tmp_path}/nope" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["train", "--config", "no/such.yaml"]) == 2
    assert "config file not found: no/such.yaml" in capsys.readouterr().err


def test_train_with_mlflow_logs_a_standalone_run(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    uri = mlflow_sqlite
    assert main(["train", "--smoke-test", "--tracking-uri", uri, "--output", str(tmp_path / "run")]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spntune").experiment_id])
    assert run.info.status == "FINISHED" and "refined_miou" in run.data.metrics


def test_switching_the_refiner_kind_from_the_command_line_starts_its_section_afresh():
    from spntune.config import TrialConfig, layer_config

    camvid = str(CONFIGS / "camvid.yaml")  # refiner: cspn k3, T6, 32 channels
    assert TrialConfig.from_dict(layer_config(camvid, ["refiner.kind=none"], smoke=False)).refiner.kind == "none"
    dyspn = TrialConfig.from_dict(layer_config(camvid, ["refiner.kind=dyspn", "refiner.kernel_size=7"], smoke=False))
    assert (dyspn.refiner.kind, dyspn.refiner.kernel_size) == ("dyspn", 7)
    same = TrialConfig.from_dict(layer_config(camvid, ["refiner.kind=cspn", "refiner.iterations=3"], smoke=False))
    assert (same.refiner.kernel_size, same.refiner.iterations) == (3, 3)  # same kind: the file's keys stay


def test_train_that_finds_bad_data_leaves_the_output_folder_as_it_was(tmp_path, capsys):
    """A mask found out of range while decoding (after the listing passed) stops training before the first
    checkpoint: config.yaml is written with the weights it describes, so an earlier run's config.yaml in the
    same folder still describes its checkpoint.pt (it was overwritten before)."""
    from fixtures import make_folder, write_png

    root = make_folder(tmp_path / "data")
    write_png(root / "masks" / "train" / "img0.png", np.full((40, 50), 50, np.uint8))  # 3 classes: 50 is none
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("earlier: run\n")
    args = ["train", "--smoke-test", "--set", "data.name=folder", "--set", f"data.root={root}", "--output", str(out)]
    assert main(args) == 2
    assert "has values [50] outside the dataset's classes" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "earlier: run\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA device")
def test_train_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    assert main(["train", "--smoke-test", "--set", "train.device=cuda", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.device='cuda' but no CUDA device is available" in err and "Traceback" not in err


def test_train_refuses_a_missing_data_root_before_importing_torch(tmp_path):
    code = (
        "import sys; from spntune.cli import main; "
        f"rc = main(['train', '--set', 'data.name=folder', '--set', 'data.root={tmp_path}/nope']); "
        "print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert f"data.root '{tmp_path}/nope' is not a directory" in done.stderr
