import math
import tempfile
from pathlib import Path

import pytest
import torch
from fixtures import HostReads

import spntune.trainables as trainables
from spntune import losses
from spntune.config import TrialConfig
from spntune.errors import ConfigError, NonFiniteLossError
from spntune.leaderboard import is_trial_metric
from spntune.reporting import Reporter, Reporters, TrialStopped
from spntune.status import TrialStatus
from spntune.trainables import HISTORY_FILE, load_checkpoint, read_history, train_segmentation

TINY = {
    "data.image_size": [64, 64],
    "data.train_size": 8,
    "data.val_size": 4,
    "train.batch_size": 4,
    "train.epochs": 2,
    "refiner.channels": 8,
    "refiner.iterations": 3,
    "train.viz_samples": 0,
}


def with_refiner(kind, **config):
    """TINY with another refiner kind: ``none`` takes no refiner settings."""
    kept = {k: v for k, v in TINY.items() if kind != "none" or not k.startswith("refiner.")}
    return {**kept, "refiner.kind": kind, **config}


class Collect(Reporter):
    def __init__(self, checkpoints=False):
        self.rows = []
        self.checkpoints = checkpoints
        self.checkpoint_files = []
        self.ended = []

    def report(self, epoch):
        self.rows.append(epoch.metrics)
        if self.checkpoints:
            with tempfile.TemporaryDirectory() as tmp:
                epoch.write_checkpoint(Path(tmp), True)
                self.checkpoint_files.append(sorted(p.name for p in Path(tmp).iterdir()))

    def end(self, status, reason=""):
        self.ended.append((status, reason))


@pytest.mark.parametrize("kind", ["none", "cspn", "dyspn"])
def test_joint_training_reports_every_epoch(kind):
    rep = Collect()
    out = train_segmentation(with_refiner(kind), rep)
    assert [r["epoch"] for r in rep.rows] == [1, 2]
    m = out["metrics"]
    for key in ("coarse_miou", "refined_miou", "coarse_boundary_iou", "refined_boundary_iou", "refined_iou_curve"):
        assert 0.0 <= m[key] <= 1.0 or math.isnan(m[key])
    assert all(is_trial_metric(k) for k in m if k not in ("epoch", "phase")), m.keys()  # what --metric accepts
    steps = [k for k in m if k.startswith("refined_miou_t")]
    assert len(steps) == (1 if kind == "none" else 4)
    assert m["refined_miou_t0"] == pytest.approx(m["coarse_miou"])  # t = 0 is the coarse prediction
    assert m[steps[-1]] == pytest.approx(m["refined_miou"])
    if kind == "none":
        assert m["refined_miou"] == m["coarse_miou"]


def test_two_stage_freezes_the_coarse_network():
    rep = Collect()
    cfg = {**TINY, "train.stage": "two_stage", "train.coarse_epochs": 1, "train.refine_epochs": 2}
    train_segmentation(cfg, rep)
    assert [r["phase"] for r in rep.rows] == ["coarse", "refine", "refine"]
    # coarse frozen (weights and BatchNorm statistics) during refinement: same coarse metrics
    assert rep.rows[1]["coarse_miou"] == rep.rows[2]["coarse_miou"]
    # during the coarse phase the zero-initialised refiner changes nothing
    assert rep.rows[0]["refined_miou"] == pytest.approx(rep.rows[0]["coarse_miou"])


def test_same_seed_same_metrics():
    a, b = Collect(), Collect()
    train_segmentation({**TINY, "train.epochs": 1}, a)
    train_segmentation({**TINY, "train.epochs": 1}, b)
    assert a.rows[0]["refined_miou"] == b.rows[0]["refined_miou"]
    assert a.rows[0]["train_loss"] == b.rows[0]["train_loss"]
    c = Collect()
    train_segmentation({**TINY, "train.epochs": 1, "train.seed": 1}, c)
    assert c.rows[0]["train_loss"] != a.rows[0]["train_loss"]


def test_checkpoint_round_trip_and_resume(tmp_path):
    rep = Collect(checkpoints=True)
    out_dir = tmp_path / "run"
    train_segmentation({**TINY, "output_dir": str(out_dir), "train.viz_samples": 1}, rep)
    assert rep.checkpoint_files == [["checkpoint.pt", HISTORY_FILE]] * 2
    state = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["refiner"]["kind"] == "cspn"
    assert (out_dir / "config.yaml").is_file()
    assert (out_dir / "panels" / "panel_000.png").is_file() and (out_dir / "panels" / "steps_000.png").is_file()

    # resume after epoch 1 of 3 gives the same final metrics as an uninterrupted run
    full = Collect()
    train_segmentation({**TINY, "train.epochs": 3}, full)
    with pytest.raises(_Interrupted):
        train_segmentation({**TINY, "train.epochs": 3, "output_dir": str(tmp_path / "a")}, _StopAfter(Collect(), 1))
    resumed = Collect()
    train_segmentation({**TINY, "train.epochs": 3}, resumed, resume_from=tmp_path / "a")
    assert [r["epoch"] for r in resumed.rows] == [2, 3]
    assert resumed.rows[-1]["refined_miou"] == pytest.approx(full.rows[-1]["refined_miou"], abs=1e-6)
    assert resumed.rows[-1]["train_loss"] == pytest.approx(full.rows[-1]["train_loss"], rel=1e-5)


class _Interrupted(Exception):
    pass


class _StopAfter(Reporter):
    def __init__(self, inner, epochs):
        self.inner, self.epochs = inner, epochs

    def report(self, epoch):
        self.inner.report(epoch)
        if epoch.metrics["epoch"] >= self.epochs:
            raise _Interrupted


def test_resume_helper_interrupts(tmp_path):
    with pytest.raises(_Interrupted):
        train_segmentation({**TINY, "output_dir": str(tmp_path)}, _StopAfter(Collect(), 1))
    assert load_checkpoint(tmp_path)["epoch"] == 0


def test_nan_loss_stops_with_a_clear_error(monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "ce", lambda logits, target: logits.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at epoch 1, batch 1.*optim.lr"):
        train_segmentation({**TINY, "train.epochs": 1})


def test_a_nan_loss_names_its_own_batch_though_read_one_batch_late(monkeypatch):
    """The losses are read back a batch late (``_LateLosses``): a NaN in the middle batch and one in the
    last (read after the loop) each name their own batch."""
    ce = losses.LOSSES["ce"]
    for bad in (2, 3):  # train_size 12, batch 4: 3 batches
        calls = []

        def nan_at(logits, target, bad=bad, calls=calls):
            calls.append(1)
            scale = float("nan") if (len(calls) + 1) // 2 == bad else 1.0  # two loss calls per batch (joint)
            return ce(logits, target) * scale

        monkeypatch.setitem(losses.LOSSES, "ce", nan_at)
        with pytest.raises(NonFiniteLossError, match=rf"became nan at epoch 1, batch {bad} "):
            train_segmentation({**TINY, "data.train_size": 12, "train.epochs": 1})


def test_train_loss_is_the_image_weighted_mean_of_the_batch_losses(monkeypatch):
    """``train_loss`` and its coarse / refined parts, from the late reads: the mean over images of each
    batch's loss (the loader drops a short last batch: 3 batches of 4 of 14 images)."""
    ce, seen = losses.LOSSES["ce"], []

    def recording(logits, target):
        loss = ce(logits, target)
        seen.append((loss.item(), target.shape[0]))
        return loss

    monkeypatch.setitem(losses.LOSSES, "ce", recording)
    out = train_segmentation({**TINY, "data.train_size": 14, "train.epochs": 1})
    train = seen[: 2 * 3]  # 3 training batches, coarse then refined loss each; validation's follow
    assert [n for _, n in train] == [4] * 6
    coarse = sum(v * n for v, n in train[0::2]) / 12
    refined = sum(v * n for v, n in train[1::2]) / 12
    m = out["metrics"]
    assert m["train_loss_coarse"] == pytest.approx(coarse, rel=1e-6)
    assert m["train_loss_refined"] == pytest.approx(refined, rel=1e-6)
    assert m["train_loss"] == pytest.approx(0.5 * coarse + refined, rel=1e-6)  # joint: train.coarse_loss_weight 0.5


def test_late_losses_return_each_batch_once_in_order():
    late = trainables._LateLosses(torch.device("cpu"))
    assert late.push(0, 4, torch.tensor([1.0, 2.0, 3.0])) is None
    assert late.push(1, 2, torch.tensor([4.0, 5.0, 6.0])) == (0, 4, [1.0, 2.0, 3.0])
    assert late.flush() == (1, 2, [4.0, 5.0, 6.0])
    assert late.flush() is None


def test_a_training_epoch_reads_nothing_back_per_batch(monkeypatch):
    """Inside ``_train_epoch`` nothing of the training step is read back to the host batch by batch: no
    ``.item()``, ``bool(tensor)`` or boolean indexing (``aten._local_scalar_dense`` / ``aten.nonzero``; on a
    GPU each waits for the device). Reads from the data pipeline (the loader's seeds, the transforms' RNG,
    CPU tensors in any case) are left out. SGD: Adam's step counters are CPU tensors read by ``.item()``."""
    mode = HostReads(ignore=lambda files: any("spntune/data/" in f or "torch/utils/data/" in f for f in files))
    epoch = trainables._train_epoch

    def counted(*args, **kwargs):
        with mode:
            return epoch(*args, **kwargs)

    monkeypatch.setattr(trainables, "_train_epoch", counted)
    train_segmentation({**TINY, "train.loss": "ce+dice+focal+jaccard+lovasz", "optim.name": "sgd", "train.epochs": 1})
    assert mode.reads == []


def _steps_under_a_scaler(optimiser, model, x, overflow_first=True):
    """Four AMP-style steps (GradScaler on the CPU, grad clip as the loop does); the first overflows."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for i in range(4):
        optimiser.zero_grad(set_to_none=True)
        loss = model(x).pow(2).sum() * (1e35 if i == 0 and overflow_first else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimiser)
        scaler.update()
    return model.weight.detach().clone()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimisers_skip_an_overflowing_first_step_as_the_unfused_ones_do(name):
    """The fused kernels (what CUDA trials get), run on the CPU: a first step GradScaler skips for an inf
    leaves them where the unfused optimiser is. Fused SGD once kept an uninitialised momentum buffer
    from such a step (weights off by up to 1e24 after four steps)."""
    cfg = TrialConfig.from_dict({"optim.name": name})
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)
        optimiser, _ = trainables._optimiser(cfg, list(model.parameters()), 1, 4, fused=fused)
        assert bool(optimiser.param_groups[0]["fused"]) is fused
        results.append(_steps_under_a_scaler(optimiser, model, torch.randn(8, 16)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_a_cpu_checkpoint_resumes_into_a_fused_optimiser():
    """A state written unfused (on the CPU, or by an older spntune) loaded into a fused optimiser: the flag
    is this machine's before loading, so torch places ``step`` as the fused kernels want it (float32 on the
    parameter's device; a float64 step shows the cast here), and the fused steps run on."""
    cfg = TrialConfig.from_dict({"optim.name": "adamw"})
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    written, _ = trainables._optimiser(cfg, list(model.parameters()), 1, 4)
    model(torch.randn(8, 16)).sum().backward()
    written.step()
    state = written.state_dict()
    assert state["param_groups"][0]["fused"] is None
    for entry in state["state"].values():
        entry["step"] = entry["step"].double()
    resumed, _ = trainables._optimiser(cfg, list(model.parameters()), 1, 4, fused=True)
    trainables.load_optimiser_state(resumed, state)
    assert resumed.param_groups[0]["fused"] is True
    assert resumed.state[model.weight]["step"].dtype == torch.float32
    _steps_under_a_scaler(resumed, model, torch.randn(8, 16), overflow_first=False)
    assert int(resumed.state[model.weight]["step"]) == 5


def test_a_resumed_optimiser_keeps_this_machines_fused_choice():
    """A checkpoint's optimiser state carries the writer's ``fused`` flag (True from a CUDA trial, None from
    the CPU or an older spntune); resuming keeps the flag the optimiser was built with here, and the state."""
    params = [torch.nn.Parameter(torch.randn(3))]
    written = torch.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    written.step()
    state = written.state_dict()
    state["param_groups"][0]["fused"] = True
    resumed = torch.optim.Adam(params, lr=0.5)
    trainables.load_optimiser_state(resumed, state)
    assert resumed.param_groups[0]["fused"] is None  # built unfused here (CPU parameters)
    assert resumed.param_groups[0]["lr"] == 0.1  # the rest comes from the checkpoint
    assert int(resumed.state_dict()["state"][0]["step"]) == 1


@pytest.mark.parametrize("arch", ["deeplabv3plus", "fcn"])
def test_other_architectures_train(arch):
    out = train_segmentation(
        {**TINY, "train.epochs": 1, "model.arch": arch, "refiner.kind": "dyspn", "refiner.kernel_size": 5}
    )
    assert out["metrics"]["epoch"] == 1


def test_losses_all_train():
    out = train_segmentation({**TINY, "train.epochs": 1, "train.loss": "ce+dice+focal+lovasz+jaccard"})
    assert math.isfinite(out["metrics"]["train_loss"])


@pytest.mark.parametrize("point", ["start", "report"])
def test_history_is_whole_after_a_crash_and_resume(tmp_path, monkeypatch, point):
    """A crash right after a report ("start" of the next epoch) or between checkpoint and report: the
    history beside the checkpoint still holds every epoch exactly once, with the metrics reported."""
    monkeypatch.setenv("SPNTUNE_CRASH_ONCE", f"{tmp_path / 'crashed'}:2:{point}")
    out_dir = tmp_path / "run"
    cfg = {**TINY, "train.epochs": 3, "output_dir": str(out_dir)}
    before, after = Collect(), Collect()
    with pytest.raises(RuntimeError, match=f"injected crash at the {point} of epoch 2"):
        train_segmentation(cfg, before)
    assert [r["epoch"] for r in before.rows] == [1]  # epoch 2 was never reported
    train_segmentation(cfg, after, resume_from=out_dir)
    assert [r["epoch"] for r in after.rows] == ([2, 3] if point == "start" else [3])

    history = read_history((out_dir / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["epoch"] for h in load_checkpoint(out_dir)["extra"]["history"]] == [1, 2, 3]
    for row in before.rows + after.rows:  # the history is what the reporters saw
        assert history[row["epoch"] - 1]["refined_miou"] == row["refined_miou"]
        assert history[row["epoch"] - 1]["phase"] == row["phase"]


def test_crash_injection_spec_defaults_to_the_start_of_an_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SPNTUNE_CRASH_ONCE", f"{tmp_path / 'a:b' / 'crashed'}:1")
    (tmp_path / "a:b").mkdir()
    with pytest.raises(RuntimeError, match="injected crash at the start of epoch 1"):
        train_segmentation({**TINY, "train.epochs": 1})
    train_segmentation({**TINY, "train.epochs": 1})  # once only: the marker exists now


def test_reporters_hear_how_the_trial_ended(monkeypatch):
    ok = Collect()
    train_segmentation({**TINY, "train.epochs": 1}, ok)
    assert ok.ended == [(TrialStatus.COMPLETED, "")]

    class StopAtOnce(Collect):  # what RayReporter does when ASHA stops a trial
        def report(self, epoch):
            super().report(epoch)
            raise TrialStopped("stopped early by the scheduler")

    stopped = StopAtOnce()
    with pytest.raises(TrialStopped):
        train_segmentation(TINY, stopped)
    assert [r["epoch"] for r in stopped.rows] == [1]
    assert stopped.ended == [(TrialStatus.STOPPED, "stopped early by the scheduler")]

    monkeypatch.setitem(losses.LOSSES, "ce", lambda logits, target: logits.sum() * float("nan"))
    failed = Collect()
    with pytest.raises(NonFiniteLossError):
        train_segmentation(TINY, failed)
    ((status, reason),) = failed.ended
    assert status is TrialStatus.ERROR and reason.startswith("NonFiniteLossError: training loss became nan")


def test_reporters_are_called_in_order():
    calls = []

    class Named(Reporter):
        def __init__(self, name, trial_id=None):
            self.name, self.id = name, trial_id

        def trial_id(self):
            return self.id

        def start(self, cfg, trial_id):
            calls.append((self.name, "start", trial_id))

        def report(self, epoch):
            calls.append((self.name, "report", epoch.metrics["epoch"]))

        def end(self, status, reason=""):
            calls.append((self.name, "end", status.value))

    both = Reporters(Named("mlflow"), Named("ray", "t1"))
    assert both.trial_id() == "t1"
    train_segmentation({**TINY, "train.epochs": 1}, both)
    assert calls == [("mlflow", "start", "t1"), ("ray", "start", "t1"), ("mlflow", "report", 1),
                     ("ray", "report", 1), ("mlflow", "end", "completed"), ("ray", "end", "completed")]  # fmt: skip


def test_two_stage_with_shared_features_keeps_the_coarse_network_frozen():
    rep = Collect()
    cfg = {**TINY, "refiner.affinity_net": "shared", "train.stage": "two_stage", "train.coarse_epochs": 1,
           "train.refine_epochs": 2}  # fmt: skip
    train_segmentation(cfg, rep)
    assert [r["phase"] for r in rep.rows] == ["coarse", "refine", "refine"]
    assert rep.rows[1]["coarse_miou"] == rep.rows[2]["coarse_miou"]  # frozen features, frozen predictions
    assert rep.rows[0]["refined_miou"] == pytest.approx(rep.rows[0]["coarse_miou"])  # identity before refining


def test_the_last_epoch_reports_the_best_epoch_scored_at_original_size(tmp_path):
    """final_* = the best epoch's weights on the validation images at their own size (40x50 here,
    trained at 64x64); equal to what spntune evaluate reports for the best checkpoint."""
    from fixtures import make_folder

    from spntune.predict import evaluate_split, load_pipeline

    data = make_folder(tmp_path / "data")
    rep = Collect()
    # constant lr: the best epoch's weights do not depend on how many epochs follow it
    cfg = {**TINY, "data.name": "folder", "data.root": str(data), "train.batch_size": 2, "train.epochs": 2,
           "optim.schedule": "constant"}  # fmt: skip
    train_segmentation(cfg, rep)
    first, last = rep.rows
    assert not any(k.startswith("final_") for k in first)
    assert last["final_images"] == 2 and last["final_epoch"] in (1, 2)
    assert all(is_trial_metric(k) for k in last if k.startswith("final_"))
    # the same weights through `evaluate` give the same numbers
    best = max(rep.rows, key=lambda r: r["refined_miou"])
    train_segmentation({**cfg, "train.epochs": best["epoch"], "output_dir": str(tmp_path / "best")}, Collect())
    scores = evaluate_split(load_pipeline(tmp_path / "best"), load_pipeline(tmp_path / "best").cfg.data)
    assert last["final_refined_miou"] == pytest.approx(scores["refined_miou"], abs=1e-6)
    assert last["final_coarse_boundary_iou"] == pytest.approx(scores["coarse_boundary_iou"], abs=1e-6)


@pytest.mark.parametrize(("setting", "device", "expected"), [("auto", "cpu", True), ("auto", "cuda", False),
                                                              (True, "cuda", True), (False, "cpu", False)])  # fmt: skip
def test_channels_last_setting_resolves_per_device(setting, device, expected):
    assert TrialConfig.from_dict({"train.channels_last": setting}).train.uses_channels_last(device) is expected


def test_channels_last_is_refused_unless_auto_or_a_boolean():
    with pytest.raises(
        ConfigError, match=r"train\.channels_last: Input should be 'auto', True or False \(got 'fast'\)"
    ):
        TrialConfig.from_dict({"train.channels_last": "fast"})


@pytest.mark.parametrize("kind", ["none", "cspn", "dyspn"])
def test_a_cpu_trial_trains_on_channels_last_memory_and_matches_contiguous(kind, monkeypatch):
    """train.channels_last: auto (the default) puts a CPU trial's conv weights and batches in channels-last
    memory; the model computes the same logits from either layout (the propagation kernels take both),
    and false keeps everything contiguous."""
    seen = []
    original = trainables._batches

    def spy(loader, device, memory_format=torch.contiguous_format):
        for image, target in original(loader, device, memory_format):
            seen.append(image.is_contiguous(memory_format=torch.channels_last) and image.shape[1] > 1)
            yield image, target

    monkeypatch.setattr(trainables, "_batches", spy)
    runs = {}
    for setting in ("auto", False):
        cfg = TrialConfig.from_dict(with_refiner(kind, **{"train.channels_last": setting, "train.epochs": 1}))
        run = trainables._build_run(cfg)
        weight = run.model.coarse.encoder.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is (setting == "auto")
        runs[setting] = run
        seen.clear()
        train_segmentation(cfg.to_dict(), Collect())
        assert seen and all(seen) is (setting == "auto")
    torch.manual_seed(0)
    image = torch.randn(2, 3, 64, 64)
    runs[False].model.load_state_dict(runs["auto"].model.state_dict())
    outs = []
    for setting, fmt in (("auto", torch.channels_last), (False, torch.contiguous_format)):
        runs[setting].model.eval()
        with torch.no_grad():
            outs.append(runs[setting].model(image.contiguous(memory_format=fmt)).refined_logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("device", "amp", "cpu_bf16", "native", "expected"),
                         [("cuda", True, False, False, True), ("cuda", False, True, True, False),
                          ("cpu", True, False, True, False), ("cpu", False, True, True, True),
                          ("cpu", True, True, False, False)])  # fmt: skip
def test_autocast_resolves_per_device(device, amp, cpu_bf16, native, expected):
    train = TrialConfig.from_dict({"train.amp": amp, "train.cpu_bf16": cpu_bf16}).train
    assert train.uses_autocast(device, native) is expected


@pytest.mark.skipif(not trainables.cpu_bf16_native(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("kind", ["cspn", "dyspn"])
def test_cpu_bf16_runs_the_coarse_network_in_bf16_and_the_refiner_in_float32(kind):
    """train.cpu_bf16: the coarse network's convolutions compute in bfloat16, the refiner's affinity
    network and propagation in float32; the trial trains, and its checkpointed weights stay float32."""
    cfg = TrialConfig.from_dict(with_refiner(kind, **{"train.cpu_bf16": True, "train.epochs": 1}))
    run = trainables._build_run(cfg)
    assert run.amp and not run.scaler.is_enabled()
    dtypes: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes[name] = output.dtype  # returns None: the output stays as it is

        return hook

    hooks = [run.model.coarse.encoder.conv1.register_forward_hook(record("coarse")),
             run.model.refiner.affinity_net.register_forward_hook(record("affinity"))]  # fmt: skip
    with torch.autocast("cpu", enabled=run.amp):
        out = run.model(torch.randn(2, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert dtypes == {"coarse": torch.bfloat16, "affinity": torch.float32}
    assert out.coarse_logits.dtype == torch.bfloat16 and out.refined_logits.dtype == torch.float32
    rep = Collect()
    result = train_segmentation(cfg.to_dict(), rep)
    assert rep.rows and math.isfinite(rep.rows[-1]["train_loss"])
    assert 0.0 <= result["metrics"]["refined_miou"] <= 1.0
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


def test_cpu_bf16_without_native_bf16_trains_in_float32_and_says_so(monkeypatch):
    monkeypatch.setattr(trainables, "cpu_bf16_native", lambda: False)
    cfg = TrialConfig.from_dict(with_refiner("cspn", **{"train.cpu_bf16": True, "train.device": "cpu"}))
    with pytest.warns(UserWarning, match="train.cpu_bf16: this CPU has no native bfloat16"):
        run = trainables._build_run(cfg)
    assert not run.amp
