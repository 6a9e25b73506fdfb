"""The fused Triton step, checked on CPU with Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton's ``@triton.jit`` decorators run, so every check
runs in subprocesses (nothing leaks into other test modules in this pytest process; two run side by
side, each a part of the script) that print one JSON line per case; the tests below read them.
Float64 throughout (the interpreter runs the kernels in numpy), against the unfold reference and
autograd through it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

pytestmark = pytest.mark.skipif(find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from spntune.models import propagation as P

    def emit(case, **fields):
        print(json.dumps({"case": case, **fields}), flush=True)

    # auto on CPU tensors never imports the Triton module, one step or T as one node
    x = torch.zeros(1, 1, 4, 4)
    P.propagate_step(x, x, torch.zeros(1, 8, 4, 4), None, x[:, :1], 3)
    P.propagate(x, [(torch.zeros(1, 8, 4, 4), None, x[:, :1])] * 2, 3)
    emit("lazy", imported="spntune.models.triton_propagation" in sys.modules)

    P.set_propagation_backend("triton")

    def inputs(k, shape, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        b, c, h, w = shape
        return [
            torch.randn(b, c, h, w, generator=g, dtype=dtype),
            torch.randn(b, c, h, w, generator=g, dtype=dtype),
            torch.randn(b, k * k - 1, h, w, generator=g, dtype=dtype),
            torch.rand(b, P.num_rings(k) + 1, h, w, generator=g, dtype=dtype),
        ]

    def weights(variant, k, aff, att):
        if variant == "dyspn-factored":  # what the DySPN refiner passes: affinity, self, anchor, ring scale
            return P.dyspn_factored_weights(aff, att, k)
        if variant == "dyspn":
            return P.dyspn_weights(aff, att, k)
        return P.cspn_weights(aff, variant.split("-")[1])

    def compare(case, k, variant, shape, dtype=torch.float64):
        leaves = [t.requires_grad_() for t in inputs(k, shape, dtype)]
        h, h0, aff, att = leaves
        w = weights(variant, k, aff, att)
        out = P.propagate_step(h, h0, *w[:3], k, *w[3:])
        ref = P.propagate_step_reference(h, h0, *w[:3], k, *w[3:])
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        got = torch.autograd.grad(out, leaves, grad_out, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(ref, leaves, grad_out, allow_unused=True)
        errors = {"forward": (out - ref).abs().max().item()}
        for name, a, b in zip(("h", "h0", "affinity", "attention"), got, want):
            if b is None:
                errors[name] = 0.0 if a is None else float("inf")
            else:
                errors[name] = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        emit(case, errors=errors)

    # == part: one step against the reference ==
    for k in (3, 5, 7):
        for variant in ("cspn-h0", "cspn-ht", "dyspn"):
            compare(f"k{k}-{variant}", k, variant, (2 if k == 3 else 1, 3, 11, 13))
    # several tiles each way, a partial last tile, and more channels than one channel block
    compare("tiles-channels", 3, "dyspn", (1, 17, 19, 37))
    compare("float32", 5, "dyspn", (1, 3, 11, 13), dtype=torch.float32)
    # factored DySPN weights (what the refiner passes): the kernels multiply affinity and ring scale
    for k in (3, 5, 7):
        compare(f"factored-k{k}", k, "dyspn-factored", (2 if k == 3 else 1, 3, 11, 13))
    compare("factored-tiles-channels", 5, "dyspn-factored", (1, 17, 19, 37))
    compare("factored-float32", 7, "dyspn-factored", (1, 3, 11, 13), dtype=torch.float32)
    # the ring-scale gradient alone (affinity frozen), the attention frozen (the affinity still reaches
    # the ring scale through the ring sums), and the affinity's gradient alone (ring scale detached)
    for frozen in ("affinity", "attention", "scale"):
        leaves = inputs(5, (1, 3, 9, 12), torch.float64)
        h, h0, aff, att = leaves
        for t in leaves:
            t.requires_grad_(t is not {"affinity": aff, "attention": att, "scale": None}[frozen])
        w = P.dyspn_factored_weights(aff, att, 5)
        if frozen == "scale":
            w = (*w[:3], w[3].detach())
        out, ref = P.propagate_step(h, h0, *w[:3], 5, w[3]), P.propagate_step_reference(h, h0, *w[:3], 5, w[3])
        wanted = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad(out.sum(), wanted, retain_graph=True)
        want = torch.autograd.grad(ref.sum(), wanted)
        emit(f"factored-{frozen}-frozen", errors={str(i): (a - b).abs().max().item() for i, (a, b) in enumerate(zip(got, want))})

    # gradcheck of two chained steps (random projections: the interpreter is slow)
    k = 3
    _, h0, aff, att = inputs(k, (1, 2, 5, 6), torch.float64)
    h0.requires_grad_(); aff.requires_grad_(); att.requires_grad_()
    def dyspn(h0, aff, att):
        w = P.dyspn_weights(aff, att, k)
        return P.propagate(h0, [w, w], k)[0]
    emit("gradcheck", ok=bool(torch.autograd.gradcheck(dyspn, (h0, aff, att), fast_mode=True)))
    def dyspn_factored(h0, aff, att):
        sums = P.dyspn_ring_sums(aff, k)
        ws = [P.dyspn_factored_weights(aff, att, k, sums), P.dyspn_factored_weights(aff, att * 0.5, k, sums)]
        return P.propagate(h0, ws, k)[0]
    emit("gradcheck-factored", ok=bool(torch.autograd.gradcheck(dyspn_factored, (h0, aff, att), fast_mode=True)))

    # == part: T steps as one node ==
    # propagate: T steps sharing their neighbour weights run as one FusedPropagation node on the Triton
    # kernels (neighbour-weight and h0 gradients added up by the kernels): equal to step by step
    def step_weights(variant, k, aff, att):
        if variant == "dyspn-factored":
            sums = P.dyspn_ring_sums(aff, k)
            return [P.dyspn_factored_weights(aff, att * s, k, sums) for s in (1.0, 0.5, 0.25)]
        return [weights(variant, k, aff, att)] * 3

    one_node = [(v, (1, 3, 10, 13), torch.float64, None) for v in ("cspn-h0", "cspn-ht", "dyspn-factored")]
    # batches, more channels than one block and several padded tiles; float32; each input frozen
    one_node += [("dyspn-factored", (2, 17, 9, 33), torch.float64, None),
                 ("cspn-h0", (1, 3, 10, 13), torch.float32, None)]
    one_node += [("dyspn-factored", (1, 3, 8, 11), torch.float64, frozen) for frozen in (0, 1, 2)]
    for variant, shape, dtype, frozen in one_node:
        k = 5 if (variant, shape, frozen) == ("dyspn-factored", (1, 3, 10, 13), None) else 3  # the interpreter is slow
        _, h0, aff, att = [t.requires_grad_() for t in inputs(k, shape, dtype)]
        if frozen is not None:
            [h0, aff, att][frozen].requires_grad_(False)
        leaves = [t for t in (h0, aff, att) if t.requires_grad]
        h, steps = P.propagate(h0, step_weights(variant, k, aff, att), k, return_steps=True)
        node = type(h.grad_fn).__name__
        hs, x = [], h0
        for w in step_weights(variant, k, aff, att):
            x = P.propagate_step(x, h0, *w[:3], k, *w[3:])
            hs.append(x)
        gen = torch.Generator().manual_seed(5)
        g1, g2 = (torch.randn(h.shape, generator=gen, dtype=dtype) for _ in range(2))
        got = torch.autograd.grad((h * g1).sum() + (steps[1] * g2).sum(), leaves, allow_unused=True)
        want = torch.autograd.grad((hs[-1] * g1).sum() + (hs[0] * g2).sum(), leaves, allow_unused=True)
        errors = {"forward": max((a - b).abs().max().item() for a, b in zip(steps[1:], hs))}
        for i, (a, b) in enumerate(zip(got, want)):  # CSPN does not use the attention: None on both sides
            errors[str(i)] = 0.0 if a is None and b is None else (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        name = variant if shape[1:] in ((3, 10, 13), (3, 8, 11)) and dtype == torch.float64 else f"{variant}-{shape[1]}ch-{dtype}"
        emit(f"one-node-{name}" + (f"-frozen{frozen}" if frozen is not None else ""), errors=errors, node=node)
    # a single step, and no steps
    _, h0, aff, att = [t.requires_grad_() for t in inputs(3, (1, 3, 10, 13), torch.float64)]
    w = P.dyspn_factored_weights(aff, att, 3)
    h, _ = P.propagate(h0, [w], 3)
    want = P.propagate_step(h0, h0, *w[:3], 3, w[3])
    g_got = torch.autograd.grad(h.sum(), [h0, aff, att], retain_graph=True)
    g_want = torch.autograd.grad(want.sum(), [h0, aff, att])
    errors = {"forward": (h - want).abs().max().item()}
    errors.update({str(i): (a - b).abs().max().item() for i, (a, b) in enumerate(zip(g_got, g_want))})
    emit("one-node-one-step", errors=errors, node=type(h.grad_fn).__name__, empty=P.propagate(h0, [], 3)[0] is h0)
    """
)

CASES = [f"k{k}-{v}" for k in (3, 5, 7) for v in ("cspn-h0", "cspn-ht", "dyspn")]
CASES += ["tiles-channels", "float32"]
CASES += [f"factored-k{k}" for k in (3, 5, 7)]
CASES += ["factored-tiles-channels", "factored-float32"]
CASES += [f"factored-{frozen}-frozen" for frozen in ("affinity", "attention", "scale")]


def _parts(script: str) -> list[str]:
    """The script as runnable pieces: its prelude (imports, helpers, the lazy-import check) followed by each
    ``# == part: ... ==`` section."""
    prelude, *parts = script.split("# == part: ")
    return [prelude + part.split("\n", 1)[1] for part in parts]


def _side_by_side(jobs: list[tuple[list[str], dict[str, str]]], what: str) -> list[tuple[int, list[dict]]]:
    """Runs ``python -c`` jobs ``(args, env)`` at once (the interpreter and triton's compiler are
    single-threaded) and returns each one's exit status and the JSON lines it printed; fails the test with
    its stderr where one exits with neither 0 nor 77 (77: nothing to check here), or after 300 s."""
    procs = [subprocess.Popen([sys.executable, "-c", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args, env in jobs]  # fmt: skip
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} took over 300 s")
    finally:
        for proc in procs:
            proc.kill()  # a no-op for those that ended
    for proc, (_, err) in zip(procs, outputs, strict=True):
        if proc.returncode not in (0, 77):
            pytest.fail(f"{what} failed (rc {proc.returncode}):\n{err[-4000:]}")
    return [(proc.returncode, [json.loads(text) for text in out.splitlines() if text[:1] == "{"])
            for proc, (out, _) in zip(procs, outputs, strict=True)]  # fmt: skip


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """The interpreter cases, the script's parts in subprocesses side by side (in one, 41-50 s on the 2-core
    VM)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPNTUNE_PROPAGATION": "auto"}
    runs = _side_by_side([([part], env) for part in _parts(_SCRIPT)], "the interpreter run")
    return {row["case"]: row for _, rows in runs for row in rows}


def test_cpu_auto_backend_does_not_import_triton(results):
    assert results["lazy"]["imported"] is False


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_forward_and_backward(results, case):
    tol = 1e-5 if case.endswith("float32") else 1e-12
    errors = results[case]["errors"]
    assert max(errors.values()) <= tol, errors


ONE_NODE = ["cspn-h0", "cspn-ht", "dyspn-factored", "dyspn-factored-17ch-torch.float64", "cspn-h0-3ch-torch.float32"]
ONE_NODE += [f"dyspn-factored-frozen{i}" for i in range(3)] + ["one-step"]


@pytest.mark.parametrize("case", ONE_NODE)
def test_propagate_runs_one_node_equal_to_step_by_step(results, case):
    r = results[f"one-node-{case}"]
    assert r["node"] == "FusedPropagationBackward"
    assert max(r["errors"].values()) <= (1e-5 if "float32" in case else 1e-12), r["errors"]
    if case == "one-step":
        assert r["empty"] is True


def test_gradcheck_two_steps(results):
    assert results["gradcheck"]["ok"]
    assert results["gradcheck-factored"]["ok"]


def test_forcing_an_unknown_backend_is_refused():
    from spntune.models.propagation import set_propagation_backend

    with pytest.raises(ValueError, match="backend must be one of"):
        set_propagation_backend("cuda")


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from spntune.models import triton_propagation as T

    def emit(**fields):
        print(json.dumps(fields), flush=True)

    arch = int(sys.argv[1])
    try:
        for k in (3, 7):
            for aligned in (False, True):
                for row in T.compiled_resources(k, 11, arch, aligned=aligned):  # 11: the widest block (8)
                    emit(arch=arch, k=k, aligned=aligned, dtype="fp32", **row)
        if arch == 90:
            for row in T.compiled_resources(7, 11, 90, dtype="fp64"):
                emit(arch=90, k=7, aligned=True, dtype="fp64", **row)
    except RuntimeError as exc:
        if str(exc).startswith("no cuobjdump"):
            sys.exit(77)  # no NVIDIA backend in this triton
        raise
    """
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """Every kernel compiled for A100 (sm_80) and H100 (sm_90), as launched on maps whose sizes are and are
    not multiples of 16, in a fresh triton cache (nothing reused from an earlier run), one subprocess per arch: no
    GPU, and TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [([_COMPILE_SCRIPT, str(arch)], {**env, "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp(f"cache-sm{arch}"))})
            for arch in (80, 90)]  # fmt: skip
    runs = _side_by_side(jobs, "compiling the kernels")
    if any(status == 77 for status, _ in runs):
        pytest.skip("this triton has no NVIDIA backend to compile for")
    return [row for _, rows in runs for row in rows]


def test_kernels_compile_for_gpus_without_spilling(compiled):
    """What the interpreter cannot show: the kernels as ptxas builds them. No stack or local memory (spills go
    there: each one a round trip to memory per thread), and in float32 at most 128 registers a thread, so
    that at least four programs of 128 threads share an SM (float64, for gradcheck on a GPU, only must not
    spill: its grad_h takes about 133). The first version of the forward took 255 registers and spilled 0.9
    KB at k = 3, 12 KB at k = 7."""
    assert len(compiled) == (2 * 2 * 2 + 1) * 4  # (arch x k x aligned + float64) x kernel
    spills = [r for r in compiled if r["stack"] or r["local"]]
    assert not spills, spills
    wide = [r for r in compiled if r["dtype"] == "fp32" and r["registers"] > 128]
    assert not wide, wide
