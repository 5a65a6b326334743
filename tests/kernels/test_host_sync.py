"""The kernel wrappers never synchronise with the host, and their torch glue around the launches is only views and
allocations.

A ``TorchDispatchMode`` sees every aten op a wrapper issues. Reading a device value on the host goes through
``aten._local_scalar_dense`` (``.item()``, ``int()``/``bool()``/``float()`` of a tensor) and data-dependent shapes
through ``aten.nonzero``, ``aten.masked_select`` or ``aten.index`` with a bool index: none may appear. Ops other
than views and allocations (fills, copies, casts, arithmetic) outside the kernel launches would each be a small
kernel launch of their own on a GPU: none may appear either in the common case (float ``p``, contiguous inputs
in the cache's dtype). The Triton interpreter's own copies during a launch are not counted. ``.tolist()`` on a
CPU tensor dispatches nothing, so the Triton modules' source is checked for it (and ``.item()``) as well.
"""
from __future__ import annotations

import ast
import inspect
import shutil

import pytest
import torch
from kernel_helpers import INTERPRET, make_cache
from torch.utils._python_dispatch import TorchDispatchMode

import twilight.kernels.cuda as cuda_kernels
from twilight.selection import Selection

triton_kernels = pytest.importorskip("twilight.kernels.triton", reason="needs triton")
triton_top_p = pytest.importorskip("twilight.kernels.triton.top_p", reason="needs triton")

aten = torch.ops.aten
_SYNCS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal}
_GLUE_OK = {  # views and allocations: no kernel of their own
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.view, aten._unsafe_view, aten.reshape,
    aten.select, aten.slice, aten.expand, aten.unsqueeze, aten.squeeze, aten.as_strided, aten.alias, aten.detach,
    aten.t, aten.transpose, aten.permute, aten.split, aten.unbind, aten.lift_fresh,
}


class _OpCounter(TorchDispatchMode):
    """Records host synchronisations and compute ops issued outside kernel launches."""

    def __init__(self):
        super().__init__()
        self.syncs, self.glue = [], []
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        bool_index = packet is aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if packet in _SYNCS or bool_index:
            self.syncs.append(str(func))
        elif not self.in_launch and packet not in _GLUE_OK:
            self.glue.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def counter(monkeypatch):
    """An `_OpCounter` that does not count inside Triton interpreter launches (the interpreter copies arguments)."""
    mode = _OpCounter()
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def counted_run(self, *args, **kwargs):
            mode.in_launch += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.in_launch -= 1

        monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    return mode


def _inputs(device="cpu", start=(0, 37)):
    cache = make_cache(2, 2, 64, length=300, dtype=torch.float16, device=device, start=list(start))
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0)).half().to(device)
    return q, cache


def _calls(kernels, q, cache):
    """(name, thunk) for every wrapper of ``kernels`` (a module with ``int4_scores``, ``top_p_mask``,
    ``top_p_threshold``, ``prune_to_selection``), each fed the previous stages' outputs (computed outside the mode)."""
    sel = triton_kernels.quest_select(q, cache, 100)
    scores = triton_kernels.int4_scores(q, cache, sel)
    pruned, _ = kernels.prune_to_selection(scores, sel, 0.9, 0.125)
    p_rows = torch.full((2, 8), 0.8, device=q.device)
    long_scores = torch.randn(2, 8, 9000, device=q.device)  # the streamed / uncached top-p paths
    long_sel = Selection(torch.arange(9000, dtype=torch.int32, device=q.device).expand(2, 2, 9000).contiguous() % 300,
                         torch.full((2, 2), 9000, dtype=torch.int32, device=q.device))
    int4_scores = getattr(kernels, "int4_scores", triton_kernels.int4_scores)
    calls = [
        ("int4_scores", lambda: int4_scores(q, cache, sel)),
        ("top_p_mask", lambda: kernels.top_p_mask(scores, 0.9)),
        ("top_p_mask per-row p", lambda: kernels.top_p_mask(scores, p_rows)),
        ("top_p_mask long rows", lambda: kernels.top_p_mask(long_scores, 0.9)),
        ("top_p_threshold", lambda: kernels.top_p_threshold(scores, 0.9)),
        ("prune_to_selection", lambda: kernels.prune_to_selection(scores, sel, 0.9, 0.125)),
        ("prune_to_selection per-row p", lambda: kernels.prune_to_selection(scores, sel, p_rows, 0.125)),
        ("prune_to_selection long rows", lambda: kernels.prune_to_selection(long_scores, long_sel, 0.9)),
    ]
    if kernels is triton_top_p:
        from twilight.kernels.triton.quest import top_pages_to_tokens

        page_scores = triton_kernels.quest_page_scores(q, cache)
        calls += [
            ("quest_select", lambda: triton_kernels.quest_select(q, cache, 100)),
            ("quest_page_scores", lambda: triton_kernels.quest_page_scores(q, cache)),
            ("top_pages_to_tokens", lambda: top_pages_to_tokens(page_scores, cache, 7)),
            ("sparse_decode_attention", lambda: triton_kernels.sparse_decode_attention(q, cache, pruned, 0.125)),
            ("sparse_decode_attention split rows",
             lambda: triton_kernels.sparse_decode_attention(q, cache, sel, 0.125, chunk=64)),
        ]
    return calls


def _assert_no_sync(counter, calls, allowed_glue=None):
    for name, call in calls:
        counter.syncs.clear()
        counter.glue.clear()
        with counter:
            call()
        assert not counter.syncs, f"{name}: host synchronisations {counter.syncs}"
        glue = [op for op in counter.glue if op not in (allowed_glue or {}).get(name, ())]
        assert not glue, f"{name}: torch ops besides views and allocations outside the launches {glue}"


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_triton_wrappers_do_not_synchronise(counter):
    q, cache = _inputs()
    _assert_no_sync(counter, _calls(triton_top_p, q, cache))


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_triton_quest_select_without_padding_does_not_synchronise(counter):
    q, cache = _inputs(start=(0, 0))
    _assert_no_sync(counter, [("quest_select", lambda: triton_kernels.quest_select(q, cache, 100))])


@pytest.mark.skipif(not INTERPRET or not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="needs TRITON_INTERPRET=1 (Quest's selection) and a C++ compiler (the CUDA emulation)")
def test_cuda_wrappers_do_not_synchronise(counter):
    cuda_kernels.load_emulated()
    cuda_kernels.enable_emulation(True)
    try:
        q, cache = _inputs()
        # The CUDA SpGEMV reads float32 queries: one cast of q [B, Hq, D] when the model runs in fp16/bf16.
        _assert_no_sync(counter, _calls(cuda_kernels, q, cache), {"int4_scores": ["aten._to_copy.default"]})
    finally:
        cuda_kernels.enable_emulation(False)


def test_counter_sees_host_reads(counter):
    """The counter itself: each kind of host read it is meant to catch is caught."""
    t = torch.arange(5)
    for read in (lambda: t[0].item(), lambda: int(t[1]), lambda: bool(t.any()), lambda: float(t[2]),
                 lambda: t.nonzero(), lambda: t[t > 2], lambda: t.masked_select(t > 2)):
        counter.syncs.clear()
        with counter:
            read()
        assert counter.syncs, "a host read went unnoticed"
    counter.glue.clear()
    with counter:
        t.float()
    assert counter.glue == ["aten._to_copy.default"]


@pytest.mark.parametrize("module", ["quest", "top_p", "spgemv", "attention", "_common"])
def test_triton_sources_read_nothing_back(module):
    """No ``.item()``/``.tolist()``/``.nonzero()``/``.masked_select()``/``.cpu()`` in the Triton wrappers' source
    (``.tolist()`` of a CPU tensor is invisible to the dispatch mode)."""
    import importlib

    tree = ast.parse(inspect.getsource(importlib.import_module(f"twilight.kernels.triton.{module}")))
    reads = [f"line {n.lineno}: .{n.func.attr}()" for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("item", "tolist", "nonzero", "masked_select", "cpu")]
    assert not reads, reads
