import logging
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from spntune.cli import main
from spntune.trainables import train_segmentation

TINY = {
    "data.image_size": [64, 64], "data.train_size": 8, "data.val_size": 4, "train.batch_size": 4,
    "train.epochs": 2, "refiner.channels": 8, "train.viz_samples": 1,
}  # fmt: skip


def test_standalone_run_logs_everything(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    uri = mlflow_sqlite
    train_segmentation({**TINY, "tracking.uri": uri, "tracking.run_name": "debug"})
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spntune").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "debug"
    steps = client.get_metric_history(run.info.run_id, "refined_miou_by_step")
    assert [m.step for m in steps] == list(range(7))  # h^0 .. h^6 at the best epoch, logged once
    assert run.data.params["refiner.kind"] == "cspn" and "tracking.uri" not in run.data.params


def test_failure_inside_training_ends_the_run_failed(tmp_path, monkeypatch, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    from spntune import losses

    calls = {"n": 0}

    def flaky(logits, target):
        calls["n"] += 1
        if calls["n"] > 3:  # fail in epoch 2, after epoch 1 was logged
            return logits.sum() * float("nan")
        return losses.cross_entropy(logits, target)

    monkeypatch.setitem(losses.LOSSES, "ce", flaky)
    uri = mlflow_sqlite
    with pytest.raises(FloatingPointError):
        no_refiner = {k: v for k, v in TINY.items() if not k.startswith("refiner.")}  # none takes no settings
        train_segmentation({**no_refiner, "tracking.uri": uri, "refiner.kind": "none"})
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spntune").experiment_id])
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError: training loss became nan" in run.data.tags["spntune.reason"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "refined_miou")] == [1]


def test_unreachable_mlflow_does_not_stop_training(caplog):
    caplog.set_level(logging.WARNING, logger="spntune.tracking")
    out = train_segmentation({**TINY, "tracking.uri": "http://127.0.0.1:9"})  # nothing listens on port 9
    assert out["metrics"]["epoch"] == 2
    assert any("training continues" in r.getMessage() or "not tracked" in r.getMessage() for r in caplog.records)


def test_predict_from_a_run_and_from_a_checkpoint(tmp_path, capsys, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    uri = mlflow_sqlite
    train_segmentation({**TINY, "tracking.uri": uri, "output_dir": str(tmp_path / "train")})
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spntune").experiment_id])
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
    for source in (["--run", run.info.run_id, "--tracking-uri", uri], ["--checkpoint", str(tmp_path / "train")]):
        out = tmp_path / ("pred-" + source[0].strip("-"))
        assert main(["predict", *source, str(image), "--out", str(out)]) == 0
        mask = Image.open(out / "photo_mask.png")
        assert mask.mode == "P" and mask.size == (70, 50)  # original size, palette PNG
        assert set(np.unique(np.asarray(mask))) <= set(range(5))
        assert Image.open(out / "photo_overlay.png").size == (70, 50)
    assert (
        main(["predict", "--run", "nonexistent", str(image), "--out", str(tmp_path / "x"), "--tracking-uri", uri]) == 2
    )
    assert "nonexistent" in capsys.readouterr().err


def test_a_local_run_is_found_and_refused_without_mlflow_or_torch(tmp_path, mlflow_sqlite):
    """A SQLite store that keeps its artifacts on this machine: `evaluate --run` refuses a split the run's
    dataset lacks, and `evaluate` / `predict --run` an id the store lacks, from sqlite3 and the checkpoint's zip
    alone (before MLflow and torch are imported: seconds); the checkpoint is then copied without MLflow."""
    from spntune import tracking

    uri = mlflow_sqlite
    train_segmentation({**TINY, "tracking.uri": uri})
    db = uri.removeprefix("sqlite:///")
    with closing(sqlite3.connect(db)) as conn:
        ((run_id, artifacts),) = conn.execute("SELECT run_uuid, artifact_uri FROM runs").fetchall()
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    cases = {
        "evaluate-split": (["evaluate", "--run", run_id, "--split", "bogus"],
                           "split 'bogus': dataset synthetic has no such split; its splits: train, val"),
        "evaluate-run": (["evaluate", "--run", "nope"], "the store has no run with that id"),
        "predict-run": (["predict", "--run", "nope", str(image), "--out", str(tmp_path / "out")],
                        "the store has no run with that id"),
    }  # fmt: skip
    for name, (argv, message) in cases.items():
        code = (f"import sys; from spntune.cli import main; rc = main({[*argv, '--tracking-uri', uri]!r}); "
                "print(rc, 'torch' in sys.modules, 'mlflow' in sys.modules)")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["2", "False", "False"], (name, done.stdout + done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)
    assert not (tmp_path / "out").exists()
    local = tracking.local_checkpoint(uri, run_id)
    assert local == Path(unquote(urlsplit(artifacts).path)) / "checkpoint" / "checkpoint.pt" and local.is_file()
    assert tracking.local_checkpoint(uri.replace("sqlite:", "sqlite+pysqlite:", 1), run_id) == local  # a driver named
    copied = tracking.download_checkpoint(uri, run_id, tmp_path / "dl")  # a copy: a running trial rewrites it
    assert copied.parent == tmp_path / "dl" and copied.read_bytes() == local.read_bytes()
    with closing(sqlite3.connect(db)) as conn, conn:  # a local root MLflow stored as a plain path
        conn.execute("UPDATE runs SET artifact_uri = ?", (str(local.parent.parent),))
    assert tracking.local_checkpoint(uri, run_id) == local
    local.unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint.pt does not exist"):
        tracking.local_checkpoint(uri, run_id)
    with closing(sqlite3.connect(db)) as conn, conn:  # artifacts elsewhere: MLflow downloads them
        conn.execute("UPDATE runs SET artifact_uri = 's3://bucket/runs/x'")
    assert tracking.local_checkpoint(uri, run_id) is None
    assert tracking.local_checkpoint("http://127.0.0.1:9", run_id) is None  # a server: asked through MLflow


def test_best_reads_the_leaderboard_from_mlflow(tmp_path, capsys, mlflow_sqlite):
    uri = mlflow_sqlite
    args = ["search", "--smoke-test", "--storage", str(tmp_path / "ray"), "--name", "lb", "--scheduler", "none",
            "--tracking-uri", uri, "--no-viz", "--set", "data.train_size=8", "--set", "data.limit_train=8"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    import shutil

    shutil.rmtree(tmp_path / "ray")  # the Ray results folder is gone; MLflow still knows
    assert main(["best", "--search", "lb", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "search lb" in out and "2 trial runs" in out
    assert out.count("completed") == 2 and "best refined_miou" in out and "run id" in out
    assert main(["best", "--search", "nope", "--tracking-uri", uri]) == 2


def _bad_checkpoints(tmp_path):
    """Files that must be refused by name, never loaded: truncated, another format, an arbitrary pickle."""
    import pickle

    good = tmp_path / "train" / "checkpoint.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    pickled = tmp_path / "payload.pt"
    pickled.write_bytes(pickle.dumps({"model": Payload()}))
    foreign = tmp_path / "foreign.pt"
    import torch

    torch.save({"weights": torch.zeros(2)}, foreign)
    return {
        truncated: "is not a readable spntune checkpoint",
        text: "is not a readable spntune checkpoint",
        pickled: "is not a readable spntune checkpoint",
        foreign: "is not a spntune checkpoint: it lacks model, config, epoch, extra",
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_predict_refuses_bad_checkpoints_and_missing_images(tmp_path, capsys):
    train_segmentation({**TINY, "train.epochs": 1, "output_dir": str(tmp_path / "train")})
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    for path, message in _bad_checkpoints(tmp_path).items():
        assert main(["predict", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr()
        assert message in err.err and str(path) in err.err and "Traceback" not in err.err
        assert "pickle code ran" not in err.out + err.err  # weights_only: the pickle never executed
    missing = tmp_path / "nope.jpg"
    assert main(["predict", "--checkpoint", str(tmp_path / "train"), str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"image not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # nothing written


def test_resuming_from_another_models_checkpoint_is_refused(tmp_path, capsys):
    train_segmentation({**TINY, "train.epochs": 1, "output_dir": str(tmp_path / "a")})
    args = ["train", "--smoke-test", "--set", "refiner.kind=dyspn", "--set", "refiner.kernel_size=5",
            "--output", str(tmp_path / "b"), "--resume", str(tmp_path / "a")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'a'}" in err and "do not fit this model" in err and "Traceback" not in err


def test_printed_tracking_uris_hide_passwords():
    from spntune.tracking import masked

    assert masked("http://alice:s3cret@mlflow.example:5000") == "http://alice:***@mlflow.example:5000"
    assert masked("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert masked("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert masked("http://host:5000") == "http://host:5000"


def test_evaluate_scores_at_original_size_exactly_what_predict_writes(tmp_path, capsys):
    """`spntune evaluate` and `spntune predict` share one upsampling (logits, bilinear, to each image's
    size): the refined mIoU evaluate reports equals the mIoU of predict's mask files against the truth."""
    import json

    from fixtures import make_folder

    from spntune.data.base import read_mask

    data = make_folder(tmp_path / "data")  # 40x50 images; the model runs at 64x64
    train_segmentation({**TINY, "train.epochs": 1, "data.name": "folder", "data.root": str(data),
                        "train.batch_size": 2, "output_dir": str(tmp_path / "run")})  # fmt: skip
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--json", str(report)]) == 0
    assert "at their" in capsys.readouterr().out
    scores = json.loads(report.read_text())
    assert scores["images"] == 2 and scores["class_names"] == ["road", "car", "sky"]

    images = sorted((data / "images" / "val").iterdir())
    assert (
        main(["predict", "--checkpoint", str(tmp_path / "run"), *map(str, images), "--out", str(tmp_path / "p")]) == 0
    )
    confusion = np.zeros((3, 3), np.int64)
    for image in images:
        pred = np.asarray(Image.open(tmp_path / "p" / f"{image.stem}_mask.png"))
        truth = read_mask(data / "masks" / "val" / f"{image.stem}.png")
        assert pred.shape == truth.shape == (40, 50)
        valid = truth != 255
        np.add.at(confusion, (truth[valid], pred[valid]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    assert scores["refined_miou"] == pytest.approx(float((tp[present] / union[present]).mean()), abs=1e-9)
    assert scores["refined_miou_t0"] == pytest.approx(scores["coarse_miou"])
    # another split and bad input
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "train"]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_end_of_search_sweep_creates_backfills_and_closes_every_trial_run(tmp_path, monkeypatch, mlflow_sqlite):
    """The driver's sweep: a trial whose run MLflow never got is created with its history, a run that
    lacks epochs gets them, every run gets its final status; a backfill that fails half-way still
    closes the run it created (nothing stays RUNNING)."""
    from mlflow.tracking import MlflowClient

    import spntune.tracking as tracking
    from spntune.leaderboard import TrialRow
    from spntune.status import TrialStatus

    uri = mlflow_sqlite
    client = MlflowClient(uri)
    exp = client.create_experiment("spntune")
    parent = client.create_run(exp, tags={"spntune.search": "s"}).info.run_id
    history = [{"epoch": e, "refined_miou": 0.1 * e, "epoch_seconds": 1.0} for e in (1, 2, 3)]
    half = client.create_run(exp, tags={tracking.TAG_PARENT: parent, tracking.TAG_TRIAL: "t_half"}).info.run_id
    client.log_metric(half, "epoch_seconds", 1.0, step=1)
    client.log_metric(half, "refined_miou", 0.1, step=1)

    def row(trial_id, status):
        return TrialRow(trial_id, status, "", 3, 0.3, history[-1], config={"train.epochs": 3}, history=history)

    rows = [
        row("t_half", TrialStatus.COMPLETED),
        row("t_none", TrialStatus.ERROR),
        row("t_fails", TrialStatus.COMPLETED),
    ]
    real_backfill = tracking._backfill

    def failing_for_one(client, experiment_id, run, parent_run_id, search_name, trial_row):
        if trial_row.trial_id != "t_fails":
            return real_backfill(client, experiment_id, run, parent_run_id, search_name, trial_row)
        client.create_run(experiment_id, tags={tracking.TAG_PARENT: parent_run_id, tracking.TAG_TRIAL: "t_fails"})
        raise ConnectionError("server went away")

    monkeypatch.setattr(tracking, "_backfill", failing_for_one)
    notes = tracking.complete_trial_runs(uri, "spntune", parent, "s", rows)
    runs = {r.data.tags[tracking.TAG_TRIAL]: r for r in client.search_runs([exp]) if tracking.TAG_TRIAL in r.data.tags}
    assert set(runs) == {"t_half", "t_none", "t_fails"}
    for trial_id in ("t_half", "t_none"):  # every epoch, exactly once
        assert [m.step for m in client.get_metric_history(runs[trial_id].info.run_id, "refined_miou")] == [1, 2, 3]
    assert {t: r.info.status for t, r in runs.items()} == {
        "t_half": "FINISHED",
        "t_none": "FAILED",
        "t_fails": "FINISHED",
    }
    assert any("t_none: its MLflow run was created at the end" in n for n in notes)
    assert any("t_half: metrics of epoch 2, 3 logged at the end" in n for n in notes)
    assert any("t_fails: MLflow backfill failed (ConnectionError: server went away)" in n for n in notes)
