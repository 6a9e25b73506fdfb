"""models/memory.py: huge pages advised over the 2 MB-aligned interior of large fresh CPU buffers only, read
back from the kernel's own record of the mapping (/proc/self/smaps), and the switch that turns it off."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spntune.models import memory, propagation
from spntune.models.propagation import cspn_weights

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="Linux with transparent huge pages available",
)


@pytest.fixture(autouse=True)
def fresh_switch(monkeypatch):
    monkeypatch.delenv("SPNTUNE_HUGE_PAGES", raising=False)
    memory._madvise.cache_clear()
    yield
    memory._madvise.cache_clear()


def _advised_bytes(t: torch.Tensor) -> int:
    """Bytes of t's memory in mappings the kernel marks ``hg`` (MADV_HUGEPAGE) in /proc/self/smaps."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, span = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            a, b = (int(v, 16) for v in head.split("-"))
            span = (max(a, lo), min(b, hi))
        elif line.startswith("VmFlags:") and span and span[1] > span[0] and " hg" in line:
            total += span[1] - span[0]
    return total


@needs_thp
def test_a_large_buffer_is_advised_over_its_aligned_interior_only():
    like = torch.empty(4, 48, 192, 256)  # 37.7 MB
    out = memory.empty_like(like)
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous()
    start = -(-out.data_ptr() // memory._HUGE) * memory._HUGE
    end = (out.data_ptr() + out.numel() * 4) // memory._HUGE * memory._HUGE
    assert _advised_bytes(out) == end - start > 0
    out.fill_(1.0)  # the memory works as any other
    assert out.sum().item() == out.numel()


@needs_thp
def test_small_buffers_and_the_off_switch_give_no_advice(monkeypatch):
    small = memory.empty_like(torch.empty(1, 48, 96, 128))  # 2.4 MB: glibc reuses heap memory for these
    assert _advised_bytes(small) == 0
    monkeypatch.setenv("SPNTUNE_HUGE_PAGES", "0")
    memory._madvise.cache_clear()
    large = memory.empty_like(torch.empty(4, 48, 192, 256))
    assert not memory.advise_huge_pages(large) and _advised_bytes(large) == 0


def test_no_advice_for_empty_or_non_contiguous_tensors_and_dtype_is_kept_or_chosen():
    t = torch.empty(2, 3, dtype=torch.float64)
    assert memory.empty_like(t).dtype == torch.float64
    assert memory.empty_like(t, torch.float32).dtype == torch.float32
    assert not memory.advise_huge_pages(torch.empty(0))
    # an expanded view claims more bytes than it owns: never advised
    assert not memory.advise_huge_pages(torch.empty(1, 1).expand(4096, 4096))


@needs_thp
def test_cspn_weights_of_the_bench_shape_come_advised_and_unchanged():
    affinity = torch.randn(4, 48, 192, 256)
    kappa = cspn_weights(affinity)[0]
    assert _advised_bytes(kappa) > 0
    s = affinity.abs().sum(1, keepdim=True).clamp_min(propagation._EPS)
    torch.testing.assert_close(kappa, affinity / s, rtol=1e-6, atol=0)
