"""models/memory.py: the pool of large CPU buffers. A block is handed out again only after the last view
of its memory is gone, never while one lives; the limit holds; the switch turns it off; other dtypes,
devices and small tensors go to torch; gradients through the propagation are unchanged by reuse."""

from __future__ import annotations

import threading

import pytest
import torch

from spntune.models import memory
from spntune.models.propagation import cspn_weights, dyspn_factored_weights, num_rings, propagate

SMALL = 1 << 16  # the tests lower the 32 MB floor to 64 KB: same code, less memory


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.delenv("SPNTUNE_BUFFER_POOL_MB", raising=False)
    monkeypatch.setattr(memory, "_MIN_BYTES", SMALL)
    monkeypatch.setattr(memory, "_pool", None)
    yield


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_a_freed_buffer_is_handed_out_again_and_a_live_one_never():
    like = torch.empty(4, 48, 16, 16)  # 192 KB
    a = memory.empty_like(like)
    assert a.shape == like.shape and a.dtype == like.dtype and a.is_contiguous() and a.data_ptr() % 64 == 0
    first = a.data_ptr()
    view = a[1:3]  # a view keeps the block in use
    del a
    b = memory.empty_like(like)
    assert b.data_ptr() != first
    del view
    c = memory.empty_like(like)
    assert c.data_ptr() == first  # the block came back when its last view went
    pool = memory.buffer_pool()
    assert pool is not None and pool.reused == 1 and pool.allocated == 2
    c.fill_(2.0)  # the memory works as any other, and b's is apart from it
    b.fill_(1.0)
    assert c.sum().item() == 2.0 * c.numel() and b.sum().item() == b.numel()
    assert _span(b)[1] <= _span(c)[0] or _span(c)[1] <= _span(b)[0]


def test_the_pool_keeps_no_more_than_its_limit(monkeypatch):
    monkeypatch.setenv("SPNTUNE_BUFFER_POOL_MB", str(300 / 1024))  # 300 KB: room for one 192 KB block
    like = torch.empty(4, 48, 16, 16)
    a, b = memory.empty_like(like), memory.empty_like(like)
    pool = memory.buffer_pool()
    del a, b
    assert pool.held_bytes == like.numel() * 4  # the second block was freed, not kept
    pool.clear()
    assert pool.held_bytes == 0


def test_a_block_of_a_size_no_longer_asked_for_makes_way(monkeypatch):
    monkeypatch.setenv("SPNTUNE_BUFFER_POOL_MB", str(300 / 1024))  # 300 KB
    big, small = torch.empty(4, 48, 16, 16), torch.empty(2, 64, 16, 16)  # 192 KB and 128 KB
    a = memory.empty_like(big)
    pool = memory.buffer_pool()
    del a
    b = memory.empty_like(small)
    del b  # 320 KB would be kept: the older 192 KB block goes
    assert pool.held_bytes == small.numel() * 4
    memory.empty_like(small)
    assert pool.reused == 1
    memory.release_buffers()
    assert pool.held_bytes == 0


def test_contiguous_copies_a_channels_last_tensor_into_pooled_memory():
    x = torch.randn(2, 48, 24, 24).contiguous(memory_format=torch.channels_last)  # 216 KB
    y = memory.contiguous(x)
    assert y.is_contiguous() and torch.equal(x, y)
    assert memory.buffer_pool().allocated == 1
    z = torch.randn(2, 3)
    assert memory.contiguous(z) is z


def test_off_switch_small_tensors_other_dtypes_and_devices_go_to_torch(monkeypatch):
    like = torch.empty(4, 48, 16, 16)
    small = memory.empty_like(torch.empty(4, 4))
    assert small.shape == (4, 4)
    half = memory.empty_like(like, torch.bfloat16)  # numpy has no bfloat16: torch serves it
    assert half.dtype == torch.bfloat16 and half.shape == like.shape
    assert memory.empty_like(like.double()).dtype == torch.float64
    assert memory.empty_like(like, torch.float64).dtype == torch.float64
    pool = memory.buffer_pool()
    assert pool.allocated + pool.reused == 2  # the two float64 buffers only (the first freed at once)
    monkeypatch.setenv("SPNTUNE_BUFFER_POOL_MB", "0")
    assert memory.buffer_pool() is None
    assert memory.empty_like(like).shape == like.shape
    monkeypatch.setenv("SPNTUNE_BUFFER_POOL_MB", "lots")
    with pytest.raises(ValueError, match="SPNTUNE_BUFFER_POOL_MB must be a number of megabytes, got 'lots'"):
        memory.empty_like(like)


def test_threads_never_share_a_live_block():
    like = torch.empty(2, 48, 16, 16)
    errors: list[str] = []

    def work(seed: int) -> None:
        for i in range(200):
            a, b = memory.empty_like(like), memory.empty_like(like)
            a.fill_(seed)
            b.fill_(-seed)
            if not (a == seed).all() or not (b == -seed).all():
                errors.append(f"thread {seed}, round {i}: a block was shared")
            del a, b

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    pool = memory.buffer_pool()
    assert pool.reused > 0 and pool.allocated <= 8


@pytest.mark.parametrize("kind", ["cspn", "dyspn"])
def test_propagation_gradients_are_the_same_from_fresh_and_reused_buffers(kind, monkeypatch):
    k = 7
    g = torch.Generator().manual_seed(5)
    # 30 channels: the maps (each step's output, grad_h, grad_h0: 115 KB) come from the pool too
    h0 = torch.randn(2, 30, 12, 20, generator=g, dtype=torch.float64)
    affinity = torch.randn(2, k * k - 1, 12, 20, generator=g, dtype=torch.float64)
    attention = torch.rand(2, num_rings(k) + 1, 12, 20, generator=g, dtype=torch.float64)

    def run(scale: float = 1.0) -> list[torch.Tensor]:
        aff = (affinity * scale).requires_grad_()
        x0 = (h0 * scale).requires_grad_()
        weights = cspn_weights(aff) if kind == "cspn" else dyspn_factored_weights(aff, attention, k)
        h, _ = propagate(x0, [weights] * 3, k)
        h.square().sum().backward()
        return [h.detach(), aff.grad, x0.grad]

    monkeypatch.setenv("SPNTUNE_BUFFER_POOL_MB", "0")
    fresh = run()
    monkeypatch.setenv("SPNTUNE_BUFFER_POOL_MB", "64")
    run(scale=-3.0)  # fills the pool with other values: a kernel that skipped elements would show
    pool = memory.buffer_pool()
    before = pool.reused
    shapes: list[tuple[int, ...]] = []
    empty = pool.empty
    monkeypatch.setattr(pool, "empty", lambda shape, dtype: shapes.append(shape) or empty(shape, dtype))
    reused = run()
    assert pool.reused > before
    # the steps' outputs and grad_h / grad_h0 (shape of h0) were pooled, besides the affinity-sized buffers
    assert shapes.count(tuple(h0.shape)) >= 3 and tuple(affinity.shape) in shapes
    for x, y in zip(fresh, reused, strict=True):
        assert torch.equal(x, y)
