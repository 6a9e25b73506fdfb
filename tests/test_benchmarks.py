"""`make bench` keeps working: every benchmark runs (tiny settings) and lands in one table and bench.json.
The numbers of a --quick run mean nothing; speed targets live in the benchmarks, never in tests."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spntune import allocator
from spntune.models import cpu_propagation

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid-mini"


@pytest.mark.slow  # ~20 s alone, more on busy cores: make test-slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid-mini not present")
def test_make_bench_quick_runs_every_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    benches = {row["benchmark"] for row in report["table"]}
    assert {"propagation", "loader", "coarse_cache", "repeats"} <= benches
    measures = {row["measure"] for row in report["table"]}
    assert "dyspn_7x7 step forward+backward / forward" in measures
    assert "cspn_7x7 same, each call from a cold cache (1 GiB written before)" in measures
    if cpu_propagation.library() is not None:  # the C++ kernels ran: each pass against its streaming floor
        assert "dyspn_7x7 kernels' backward, fraction of its streaming floor" in measures
        assert "cspn_3x3 same, at the streaming floor (maps read and written row by row, no arithmetic)" in measures
    assert "cspn_3x3 the target's forward time / memory floor (256 MiB copy bandwidth)" in measures
    assert any(m.startswith("dyspn_7x7 forward, fraction of the map's clone bandwidth at [") for m in measures)
    assert all(isinstance(row["value"], float) for row in report["table"])
    assert report["results"]["coarse_cache"]["final_scores_identical"] is True
    assert report["results"]["repeats"]["repeat_share_distinct"] == 0.0
    assert report["malloc"].startswith("reuse") == (allocator.enabled() and allocator.is_glibc())  # as trials run
    assert ("triton_gpu" in report["skipped"]) != ("triton_gpu" in benches)  # skipped exactly when no CUDA
    assert ("allocator" in report["skipped"]) != ("allocator" in benches)  # skipped exactly off glibc
    assert "make bench on" in proc.stdout and "dyspn_7x7 step forward+backward / forward" in proc.stdout


def test_step_multiply_adds_match_a_hand_count(monkeypatch):
    """The roofline's compute side counts what the kernels compute, by hand for a [1, 2, 3, 4] map, 3x3:
    CSPN (anchor weight, no self weight) does 8 + 1 multiply-adds per pixel and channel forward, 2 x (8 + 1)
    backward; DySPN (self and anchor, factored weights) 8 + 2 per channel + 8 per pixel forward, 2 x (8 + 2)
    per channel + 3 x 8 per pixel backward."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "bench_propagation", raising=False)
    monkeypatch.delitem(sys.modules, "timing", raising=False)
    from bench_propagation import step_multiply_adds

    pixels = 3 * 4
    assert step_multiply_adds((1, 2, 3, 4), 3, False, True, False) == (pixels * 2 * 9, pixels * 2 * 18)
    assert step_multiply_adds((1, 2, 3, 4), 3, True, True, True) == (pixels * (2 * 10 + 8), pixels * (2 * 20 + 24))


def test_step_bytes_match_a_hand_count(monkeypatch):
    """The bytes row counts each map once, by hand for a [1, 2, 3, 4] float32 map (a plane of 48 bytes),
    3x3. CSPN (anchor weight): forward reads h, h0 (2 channels each), 8 neighbour weights and the anchor
    weight and writes 2 output channels (15 planes); backward reads g, h, h0 and the 9 weight maps, writes
    grad_h, grad_h0 and 9 weight gradients (28 planes). DySPN (self, anchor, 1 ring scale): 11 weight maps,
    17 and 32 planes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "bench_propagation", raising=False)
    monkeypatch.delitem(sys.modules, "timing", raising=False)
    from bench_propagation import step_bytes

    assert step_bytes((1, 2, 3, 4), 3, False, True, False) == (15 * 48, 28 * 48)
    assert step_bytes((1, 2, 3, 4), 3, True, True, True) == (17 * 48, 32 * 48)
    fwd, bwd = step_bytes((4, 11, 192, 256), 3, False, True, False)
    assert round((fwd + bwd) / fwd, 2) == 2.74  # the README's CSPN 3x3 figure


@pytest.mark.parametrize("name,k", [("cspn", 3), ("dyspn", 7), ("dyspn", 3)])
def test_bench_t_step_rows_form_the_weights_a_trial_forms(monkeypatch, name, k):
    """The T-step rows run the refiner's own step_weights on a guidance built from the bench's affinity and
    attention (``refiner_and_guidance``): the same weights as the op-by-op ``step_weights`` (DySPN's attention
    through logit and the refiner's sigmoid, equal within float32 rounding), so T steps propagate the same
    maps; and for DySPN on the C++ kernels they come from the one-node path a trial takes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "bench_propagation", raising=False)
    monkeypatch.delitem(sys.modules, "timing", raising=False)
    import torch
    from bench_propagation import refiner_and_guidance, step_weights

    from spntune.models import cpu_propagation
    from spntune.models.propagation import num_rings, propagate

    torch.manual_seed(0)
    b, c, h, w, iterations = 2, 3, 9, 20, 3
    aff = torch.randn(b, k * k - 1, h, w)
    att = torch.rand(b, (num_rings(k) + 1) * iterations, h, w) * 0.98 + 0.01
    x0 = torch.rand(b, c, h, w)
    refiner, guidance = refiner_and_guidance(name, k, aff, att, iterations, c)
    assert refiner.kernel_size == k and refiner.iterations == iterations
    expected, _ = propagate(x0, step_weights(name, k, aff, att, iterations), k)
    guidance = guidance.requires_grad_()
    weights = refiner.step_weights(guidance)
    got, _ = propagate(x0, weights, k)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if name == "dyspn" and cpu_propagation.takes(guidance):
        assert type(weights[0][1].grad_fn).__name__ == "_DySPNGuidanceWeightsBackward"


@pytest.mark.parametrize("name,k", [("cspn", 3), ("dyspn", 7)])
def test_gpu_bench_case_times_what_a_trial_runs(monkeypatch, name, k):
    """``bench_triton_gpu.measure_case`` (the GPU table's rows) runs on the CPU too, here on the shifted-slice
    path and the C++ kernels: every field it reports, and its T-step rows form every step's weights with the
    refiner's own ``step_weights`` from a guidance (``refiner_and_guidance``), as the CPU bench's do, both for
    the forward and the forward+backward, on each backend."""
    for module in ("bench_triton_gpu", "bench_propagation", "timing"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_triton_gpu
    import torch
    from bench_propagation import step_bytes

    calls = []
    real = bench_triton_gpu.refiner_and_guidance

    def spying(*args):
        refiner, guidance = real(*args)
        step_weights = refiner.step_weights
        refiner.step_weights = lambda g: calls.append(g.requires_grad) or step_weights(g)
        return refiner, guidance

    monkeypatch.setattr(bench_triton_gpu, "refiner_and_guidance", spying)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 20)
    x0 = torch.randn_like(x)
    backends = ("torch", "cpp") if cpu_propagation.library() is not None else ("torch", "torch")
    m = bench_triton_gpu.measure_case(x, x0, name, k, iterations=2, repeats=3, backends=backends)
    for backend in backends:
        t = m[backend]
        assert all(t[f"{label}_ms"] > 0 for label in ("forward", "step", "T_forward", "T_fwd_bwd"))
        assert t["step_fwd_bwd_over_fwd"] == pytest.approx(t["step_ms"] / t["forward_ms"])
        assert t["T_fwd_bwd_over_fwd"] == pytest.approx(t["T_fwd_bwd_ms"] / t["T_forward_ms"])
    slow, fast = m[backends[0]], m[backends[-1]]
    assert m["fwd_speedup"] == pytest.approx(slow["forward_ms"] / fast["forward_ms"])
    assert m["train_speedup"] == pytest.approx(slow["T_fwd_bwd_ms"] / fast["T_fwd_bwd_ms"])
    terms = (False, True, False) if name == "cspn" else (True, True, True)  # self, anchor, ring scale
    assert m["forward_bytes"] == step_bytes((1, 3, 12, 20), k, *terms)[0]
    # every timed T-step call (one warm-up and one timed call per round, three rounds, both passes, both
    # backends) formed its weights through the refiner: without grad for the forward, with it for the backward
    assert calls.count(False) == calls.count(True) == 2 * 3 * len(backends)


def _interpreted(script: str) -> str:
    """The output of ``script`` run with benchmarks/ on the path under Triton's interpreter
    (``TRITON_INTERPRET=1``, set before triton is imported: a subprocess); fails the test where it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "benchmarks")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # ~30 s: Triton's interpreter runs the kernels in numpy
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_bench_cases_run_on_the_triton_backend():
    """The GPU table's three cases through ``measure_case`` with the Triton kernels, on the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``, set before triton is imported: a subprocess): a device session finds
    the benchmark's own code already run against the backend it times."""
    script = (
        "import json, torch, bench_triton_gpu as g\n"
        "x = torch.randn(1, 3, 8, 16); x0 = torch.randn_like(x)\n"
        "for name, k in g.CASES:\n"
        "    m = g.measure_case(x, x0, name, k, 2, 3)\n"
        "    print(json.dumps({'case': f'{name}_{k}', 'fields': sorted(m['triton'])}))\n"
    )
    rows = [json.loads(line) for line in _interpreted(script).splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["cspn_3", "cspn_7", "dyspn_7"]
    expected = sorted(["forward_ms", "step_ms", "T_forward_ms", "T_fwd_bwd_ms", "step_fwd_bwd_over_fwd",
                       "T_fwd_bwd_over_fwd"])  # fmt: skip
    assert all(r["fields"] == expected for r in rows)


def _check_module(monkeypatch):
    monkeypatch.delitem(sys.modules, "check_triton_gpu", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import check_triton_gpu

    return check_triton_gpu


def test_gpu_check_passes_correct_kernels_and_catches_a_wrong_one(monkeypatch, capsys):
    """``check_triton_gpu`` (what a device session runs before the GPU benchmark) on the CPU: the C++ kernels
    (or the shifted slices, without a compiler) pass every check, in float64 and float32, one step and T steps
    through ``propagate``; a step whose output is off by one part in a million fails both kinds, and gradients
    off by as much fail too. Without CUDA its command line says so and exits 0."""
    import torch

    check = _check_module(monkeypatch)
    backend = "cpp" if cpu_propagation.library() is not None else "torch"
    records = check.run_checks("cpu", backend)
    assert len(records) == 2 * 2 * len(check.CASES)
    assert all(r["ok"] for r in records), [r for r in records if not r["ok"]]
    assert {r["check"] for r in records} == {"step", "T=3"}

    class Off(torch.autograd.Function):  # the output right, its gradient scaled by 1 + 1e-6
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * (1 + 1e-6)

    real_step, real_propagate = check.propagate_step, check.propagate
    cases = check.CASES[3:4]  # DySPN 7x7
    monkeypatch.setattr(check, "propagate_step", lambda *a: real_step(*a) * (1 + 1e-6))
    monkeypatch.setattr(
        check, "propagate", lambda *a, **kw: (lambda o: (o[0] * (1 + 1e-6), o[1]))(real_propagate(*a, **kw))
    )
    wrong = check.run_checks("cpu", backend, (torch.float64,), cases)
    assert [r["ok"] for r in wrong] == [False, False]
    assert all(r["errors"]["output"] > r["tolerance"] for r in wrong)
    monkeypatch.setattr(check, "propagate_step", lambda *a: Off.apply(real_step(*a)))
    monkeypatch.setattr(check, "propagate", real_propagate)
    wrong = check.run_checks("cpu", backend, (torch.float64,), cases)
    assert wrong[0]["errors"]["output"] <= wrong[0]["tolerance"] < wrong[0]["errors"]["grad_aff"]
    assert not wrong[0]["ok"] and wrong[1]["ok"]
    assert check.main([]) == 0
    assert "no CUDA device or no triton here; nothing checked" in capsys.readouterr().out


@pytest.mark.slow  # ~30 s: Triton's interpreter runs the kernels in numpy
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_check_runs_on_the_triton_kernels_under_the_interpreter():
    """``check_triton_gpu``'s checks on the Triton kernels, on the CPU under Triton's interpreter
    (``TRITON_INTERPRET=1`` before triton is imported: a subprocess), CSPN 3x3 and DySPN 7x7 in float64: a
    device session finds the check already run against the backend it checks."""
    script = (
        "import json, torch, sys, check_triton_gpu as c\n"
        "records = c.run_checks('cpu', 'triton', (torch.float64,), (c.CASES[1], c.CASES[3]))\n"
        "print(json.dumps({'ok': [r['ok'] for r in records], 'triton': 'spntune.models.triton_propagation' in sys.modules}))\n"
    )
    result = json.loads(_interpreted(script).splitlines()[-1])
    assert result == {"ok": [True] * 4, "triton": True}
