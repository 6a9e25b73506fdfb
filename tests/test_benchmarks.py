"""`make bench` keeps working: every benchmark runs (tiny settings) and lands in one table and bench.json.
The numbers of a --quick run mean nothing; speed targets live in the benchmarks, never in tests."""

import json
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
