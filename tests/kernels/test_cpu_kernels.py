"""The ``cpu`` backend's C++ kernels (``csrc/cpu_decode.cpp``) against the torch reference.

- ``update_token``: the same codes, scale and mid as ``LayerCache._update_one`` (bit for bit), and page bounds that
  bound the keys (float32 bounds: exactly the extremes; bf16: the tightest bf16 values on either side).
- ``top_p_attend``: each query head's kept count and each kv-head's union equal the sort-based top-p oracle's
  (where ``p`` is not on a float boundary), and the output is exact attention over the returned union.
- ``quest_page_scores``: Quest's page bounds' scores against a float64 evaluation of the same bounds, from
  float32 and bf16 bounds, with left padding (pages with no valid token: ``-inf``), any group size and head dim.
- ``int4_scores``: the candidates' ``q·k`` against the float64 product of ``q`` with the dequantized keys, for
  page runs (the vector path) and scattered candidates (the scalar path), both int4 layouts, padding slots ``-inf``.
- Through the pipeline: with every candidate and the same estimates (the exact estimator), the cpu and torch
  backends attend the same tokens and give the same outputs; the cpu backend's Quest pages are the top pages of
  the float64 scores (up to rounding); with the int4 estimator its budgets are those of the float32 int4
  estimate (the torch backend rounds ``q`` and the scales to bf16 in PyTorch's GEMV: its budgets differ slightly).
- As torch operators (``torch.ops.twilight_cpu``): the schemas mark exactly ``update_token``'s three buffers as
  written; ``torch.library.opcheck`` (schema, fake implementation, AOT dispatch) passes for each; the backend calls
  them, and ``torch.compile(fullgraph=True)`` of its calls makes one graph whose results equal eager's.
- A failed build raises ``BackendUnavailableError`` saying why.
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import int4_reference, page_bounds_reference, quest_bound_reference

from twilight.cache import LayerCache
from twilight.contract import BackendUnavailableError, StepPlan
from twilight.pipeline import TwilightPipeline
from twilight.quant import unpack_int4
from twilight.selection import Selection

cpu_kernels = pytest.importorskip("twilight.kernels.cpu")


@pytest.fixture(scope="module")
def ops():
    try:
        return cpu_kernels.load()
    except BackendUnavailableError as err:  # no C++ compiler here
        pytest.skip(str(err))


def _caches(block, bounds_dtype, start):
    """Two identical caches: one for the torch update, one for the C++ one."""
    return [LayerCache(2, 3, 64, page_size=16, start=start, lazy_derived=True, int4_block=block,
                       bounds_dtype=bounds_dtype) for _ in range(2)]


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("bounds_dtype", [torch.float32, torch.bfloat16])
def test_update_token_matches_the_torch_update(ops, block, bounds_dtype):
    from twilight.kernels.cpu import CpuBackend

    torch.manual_seed(2)
    start = torch.tensor([0, 9])
    ref, fused = _caches(block, bounds_dtype, start)
    fused.token_updater = CpuBackend().token_updater(fused)
    assert fused.token_updater is not None
    k = torch.randn(2, 3, 300, 64) * (1 + 3 * torch.rand(2, 3, 300, 1))
    v = torch.randn(2, 3, 300, 64)
    for c in (ref, fused):
        c.append(k[:, :, :70], v[:, :, :70])
        c.update_derived()
        for t in range(70, 300):
            c.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            c.update_derived()
    L = 300
    assert torch.equal(fused.k_qparams[:, :, :L], ref.k_qparams[:, :, :L])
    assert torch.equal(unpack_int4(fused.k_int4, block)[:, :, :L], unpack_int4(ref.k_int4, block)[:, :, :L])
    pages = -(-L // 16)
    f, r = fused.page_bounds[:, :, :pages].float(), ref.page_bounds[:, :, :pages].float()
    if bounds_dtype == torch.float32:
        assert torch.equal(f, r)  # exact extremes
    else:
        hi, lo = page_bounds_reference(k, start, L, 16)  # each sequence paged from its first valid token
        assert bool((f[:, :, :, 0] >= hi).all()) and bool((f[:, :, :, 1] <= lo).all())
        assert bool((f[:, :, :, 0] <= r[:, :, :, 0]).all()) and bool((f[:, :, :, 1] >= r[:, :, :, 1]).all())


@pytest.mark.parametrize("G,p", [(1, 0.85), (3, 0.85), (4, 0.5), (2, 0.99), (3, 1.0)])
def test_top_p_attend_matches_the_oracle(ops, top_p_oracle, top_p_margin, masked_attention_ref, G, p):
    torch.manual_seed(G)
    B, H, D, L = 2, 2, 32, 700
    cache = LayerCache(B, H, D, quant_bits=None, keep_page_bounds=False)
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    cache.append(k, v)
    # candidates: a random subset per row, different counts, padding slots pointing anywhere
    counts = torch.tensor([[500, 37], [1, 650]], dtype=torch.int32)
    K = 650
    cand = torch.stack([torch.stack([torch.randperm(L)[:K] for _ in range(H)]) for _ in range(B)]).to(torch.int32)
    scores = torch.randn(B, H * G, K) * 4
    scores[:, :, :3] += 12  # a few heavy tokens per row, a long tail
    valid = (torch.arange(K) < counts.repeat_interleave(G, 1).unsqueeze(-1))
    scores = scores.masked_fill(~valid, float("-inf"))
    q = torch.randn(B, H * G, D)
    scale = 0.3
    out, q_counts, kept, kv_counts = ops.top_p_attend(scores, cand, counts, p, scale, q, cache.k, cache.v)
    logits = (scores * scale).double()
    oracle = top_p_oracle(logits, p)  # [B, Hq, K] over candidate slots
    sure = top_p_margin(logits, p) > 1e-5  # p not on a float boundary
    assert torch.equal(q_counts[sure], oracle.sum(-1, dtype=torch.int32)[sure])
    union = oracle.view(B, H, G, K).any(2)
    for b in range(B):
        for h in range(H):
            n = int(kv_counts[b, h])
            got = set(kept[b, h, :n].tolist())
            assert len(got) == n  # no duplicates
            if bool(sure.view(B, H, G)[b, h].all()):
                assert got == set(cand[b, h][union[b, h]].tolist())
    mask = torch.zeros(B, H, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            mask[b, h, kept[b, h, :int(kv_counts[b, h])].long()] = True
    assert torch.allclose(out.double(), masked_attention_ref(q, k, v, mask, scale), atol=1e-5)


@pytest.mark.parametrize("bounds_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,D,start", [(3, 64, [0, 37]), (4, 128, [0, 0]), (1, 16, [5, 0]), (5, 8, [0, 70]),
                                       (9, 24, [16, 3])])
def test_quest_page_scores_match_float64(ops, bounds_dtype, G, D, start):
    torch.manual_seed(G * D)
    B, H, L = 2, 2, 333
    cache = LayerCache(B, H, D, page_size=16, start=torch.tensor(start), bounds_dtype=bounds_dtype)
    cache.append(torch.randn(B, H, L, D) * 3, torch.randn(B, H, L, D))
    q = torch.randn(B, H * G, D)
    out = ops.quest_page_scores(q, cache.page_bounds, cache.start, cache.num_pages, cache.page_size, cache.length)
    ref = quest_bound_reference(q, cache)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and not torch.isnan(out).any()
    fin = torch.isfinite(ref)
    assert fin.any()
    scale = float(ref[fin].abs().max())
    assert float((out.double()[fin] - ref[fin]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("G,D", [(3, 64), (4, 128), (1, 16), (6, 10)])
def test_int4_scores_match_float64(ops, block, G, D):
    torch.manual_seed(block + G * D)
    B, H, L, K = 2, 3, 500, 150
    cache = LayerCache(B, H, D, page_size=16, int4_block=block)
    cache.append(torch.randn(B, H, L, D), torch.randn(B, H, L, D))
    q = torch.randn(B, H * G, D)
    # slots 0..47: three whole pages in order (the vector path: eight aligned consecutive tokens at a time), one of
    # them in a high nibble; then a run that starts unaligned, then scattered tokens (the scalar path)
    runs = torch.cat([torch.arange(0, 16), torch.arange(48, 64), torch.arange(block // 2, block // 2 + 16),
                      torch.arange(101, 117)])
    rest = torch.tensor([t for t in torch.randperm(L).tolist() if t not in set(runs.tolist())][:K - runs.numel()])
    cand = torch.cat([runs, rest]).int().expand(B, H, K).contiguous()
    counts = torch.tensor([[K, 131, 8], [9, 64, 0]], dtype=torch.int32)
    out = ops.int4_scores(q, cache.k_int4, cache.k_qparams, cand, counts, block)
    ref = int4_reference(q, cache, Selection(cand, counts))  # -inf at padding slots
    valid = (torch.arange(K).view(1, 1, K) < counts.unsqueeze(-1)).repeat_interleave(G, 1)  # [B, Hq, K]
    assert (out[~valid] == float("-inf")).all()
    scale = float(ref[valid].abs().max())
    assert float((out.double()[valid] - ref[valid]).abs().max()) <= 2e-6 * scale * D ** 0.5


@pytest.mark.parametrize("start", [None, [0, 45]])
def test_cpu_and_torch_backends_agree_through_the_pipeline(ops, start):
    """Every candidate (the full selector) and the same estimates (the exact estimator): the token updates, top-p,
    union and attention of the two backends give the same kept counts and outputs."""
    torch.manual_seed(4)
    B, Hq, Hkv, D, L = 2, 8, 2, 64, 1200
    cfg = {"selector": {"type": "full"}, "estimator": "exact", "pruner": {"type": "top_p", "p": 0.85},
           "dense_layers": [], "dense_below": 0}
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    k[:, :, ::97] *= 4  # a few keys the queries will like
    q = torch.randn(B, Hq, D) * 2
    results = {}
    for backend in ("torch", "cpu"):
        pipe = TwilightPipeline(dict(cfg, backend=backend), num_layers=1, num_q_heads=Hq, num_kv_heads=Hkv)
        cache = pipe.new_cache(0, B, Hkv, D, start=None if start is None else torch.tensor(start))
        cache.append(k[:, :, :L - 3], v[:, :, :L - 3])
        for t in range(L - 3, L):  # decode tokens: the token updates run too
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            out = pipe.decode(0, q, cache, D ** -0.5)
        results[backend] = out, pipe.stats.as_dict()
    (out_t, st_t), (out_c, st_c) = results["torch"], results["cpu"]
    assert st_c["per_head"] == st_t["per_head"]  # the same kept counts per query head
    assert torch.allclose(out_c, out_t, atol=1e-4), float((out_c - out_t).abs().max())
    assert st_c["mean_attended_tokens"] < 0.5 * L  # sparse


@pytest.mark.parametrize("start", [None, [0, 45]])
def test_cpu_quest_picks_the_top_pages_of_the_float64_scores(ops, start):
    """The cpu backend's Quest selection through the pipeline: the always-kept last page plus the pages with the
    highest float64 scores of the cache's bounds, up to the C++ scores' rounding (ties within it may go either
    way), and with left padding only valid positions."""
    torch.manual_seed(6)
    B, Hq, Hkv, D, L, budget, ps = 2, 8, 2, 64, 1203, 256, 16
    cfg = {"selector": {"type": "quest", "token_budget": budget, "page_size": ps}, "estimator": "int4",
           "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [], "dense_below": 0, "backend": "cpu"}
    pipe = TwilightPipeline(cfg, num_layers=1, num_q_heads=Hq, num_kv_heads=Hkv)
    cache = pipe.new_cache(0, B, Hkv, D, start=None if start is None else torch.tensor(start))
    assert cache.bounds_dtype == torch.float32  # exact bounds, as on every backend and CPU
    cache.append(torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D))
    q = torch.randn(B, Hq, D)
    sel = pipe.select(0, q, cache, pipe.plan(cache))
    ref = quest_bound_reference(q, cache)  # [B, H, P]
    n = budget // ps - 1
    tol = 1e-5 * float(ref[torch.isfinite(ref)].abs().max())
    for b in range(B):
        s0 = 0 if start is None else start[b]
        first = s0 % ps  # the sequence's pages are cut from its first valid token
        last = (L - 1 - first) // ps
        for h in range(Hkv):
            toks = sel.indices[b, h, :int(sel.counts[b, h])].long()
            assert bool((toks >= s0).all()) and len(set(toks.tolist())) == toks.numel()
            pages = set(((toks - first) // ps).tolist())
            assert last in pages
            chosen = sorted(pages - {last})
            others = sorted(set(range(last)) - set(chosen))
            cut = ref[b, h, :last].sort(descending=True).values[n - 1]  # the n-th best score
            assert float(ref[b, h, chosen].min()) >= float(cut) - tol
            assert float(ref[b, h, others].max()) <= float(cut) + tol
            # whole pages: every valid position of a chosen page
            want = [t for p_ in pages for t in range(p_ * ps + first, min((p_ + 1) * ps + first, L)) if t >= s0]
            assert sorted(toks.tolist()) == sorted(want)


def test_cpu_backend_int4_budgets_follow_the_float32_estimate(ops, top_p_oracle, top_p_margin):
    """With the int4 estimator, the cpu backend keeps exactly the top-p set of the float32 int4 estimate."""
    from twilight.kernels.cpu import CpuBackend

    torch.manual_seed(11)
    B, Hq, Hkv, D, L, p = 1, 8, 2, 64, 900, 0.85
    cfg = {"selector": {"type": "quest", "token_budget": 256, "page_size": 16}, "estimator": "int4",
           "pruner": {"type": "top_p", "p": p}, "dense_layers": [], "dense_below": 0, "backend": "cpu"}
    pipe = TwilightPipeline(cfg, num_layers=1, num_q_heads=Hq, num_kv_heads=Hkv)
    cache = pipe.new_cache(0, B, Hkv, D)
    k = torch.randn(B, Hkv, L, D)
    k[:, :, ::53] *= 4
    cache.append(k, torch.randn(B, Hkv, L, D))
    q = torch.randn(B, Hq, D) * 2
    backend = CpuBackend()
    plan = pipe.plan(cache)
    sel = pipe.select(0, q, cache, plan)
    _, _, q_counts = backend.prune_attend(q, cache, sel, pipe.config.estimator, pipe.config.pruner, D ** -0.5, plan)
    logits = int4_reference(q, cache, sel) * D ** -0.5  # -inf at padding slots
    sure = top_p_margin(logits, p) > 1e-5  # p not on a float boundary of the float64 estimate
    assert sure.float().mean() > 0.5
    assert torch.equal(q_counts[sure], top_p_oracle(logits, p).sum(-1, dtype=torch.int32)[sure])


# The operators: registered with torch (torch.ops.twilight_cpu), with exact mutation annotations and fake
# implementations, and what the backend calls, so that torch.compile captures the step without a graph break.

# opcheck's checks that apply: the schema (what is mutated, no aliasing of outputs to inputs), the fake
# implementation against the real one, and AOT dispatch (functionalization of the in-place update). Not
# test_autograd_registration: the ops are not differentiable (positions, counts, estimates) and the decode step
# runs them on tensors that do not require grad.
_OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _small_cache(bounds_dtype=torch.float32, block=32, L=100):
    torch.manual_seed(5)
    B, H, D = 2, 2, 32
    cache = LayerCache(B, H, D, page_size=16, start=torch.tensor([0, 9]), int4_block=block, bounds_dtype=bounds_dtype,
                       lazy_derived=True)  # a token appended later waits for its update
    cache.append(torch.randn(B, H, L, D) * 2, torch.randn(B, H, L, D))
    cache.update_derived()
    return cache


def _candidates(cache, K=40):
    B, H, L = cache.k.shape[0], cache.k.shape[1], cache.length
    cand = torch.stack([torch.stack([torch.randperm(L)[:K] for _ in range(H)]) for _ in range(B)]).int()
    return cand, torch.tensor([[K, 17], [3, 0]], dtype=torch.int32)


def test_the_schemas_say_exactly_what_each_op_writes(ops):
    written = {name: {a.name for a in getattr(ops, name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write}
               for name in ("update_token", "quest_page_scores", "int4_scores", "top_p_attend")}
    assert written == {"update_token": {"k_int4", "k_qparams", "page_bounds"}, "quest_page_scores": set(),
                       "int4_scores": set(), "top_p_attend": set()}
    assert all(getattr(ops, name).default._schema.returns == [] or all(
        r.alias_info is None for r in getattr(ops, name).default._schema.returns) for name in written)


@pytest.mark.parametrize("bounds_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_quest_page_scores(ops, bounds_dtype):
    cache = _small_cache(bounds_dtype)
    q = torch.randn(2, 6, 32)
    torch.library.opcheck(ops.quest_page_scores.default, (q, cache.page_bounds, cache.start, cache.num_pages,
                                                          cache.page_size, cache.length), test_utils=_OPCHECK_UTILS)


@pytest.mark.parametrize("block", [32, 64])
def test_opcheck_int4_scores(ops, block):
    cache = _small_cache(block=block)
    cand, counts = _candidates(cache)
    q = torch.randn(2, 6, 32)
    torch.library.opcheck(ops.int4_scores.default, (q, cache.k_int4, cache.k_qparams, cand, counts, block),
                          test_utils=_OPCHECK_UTILS)


def test_opcheck_top_p_attend(ops):
    cache = _small_cache()
    cand, counts = _candidates(cache)
    q = torch.randn(2, 6, 32)
    scores = ops.int4_scores(q, cache.k_int4, cache.k_qparams, cand, counts, 32)
    torch.library.opcheck(ops.top_p_attend.default, (scores, cand, counts, 0.9, 32 ** -0.5, q, cache.k, cache.v),
                          test_utils=_OPCHECK_UTILS)


@pytest.mark.parametrize("buffers", ["all", "bounds only", "int4 only"])
def test_opcheck_update_token(ops, buffers):
    cache = _small_cache(torch.bfloat16 if buffers == "bounds only" else torch.float32)
    cache.append(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))  # a decode token, not yet derived
    quant, bounds = buffers != "bounds only", buffers != "int4 only"
    args = (cache.k, cache.k_int4 if quant else None, cache.k_qparams if quant else None,
            cache.page_bounds if bounds else None, cache.start, cache.length - 1, cache.page_size, cache.int4_block)
    torch.library.opcheck(ops.update_token.default, args, test_utils=_OPCHECK_UTILS)


def test_the_backend_calls_the_registered_ops(ops):
    from twilight.kernels.cpu import CpuBackend

    backend = CpuBackend()
    for name in ("update_token", "quest_page_scores", "int4_scores", "top_p_attend"):
        assert getattr(backend, "_" + name) is getattr(torch.ops.twilight_cpu, name).default


def test_compiled_quest_scores_and_int4_estimate_have_no_graph_break(ops):
    """torch.compile(fullgraph=True) of the backend's Quest page scores and int4 estimate on a cache: one graph
    holding the two operators (traced with their fake implementations, functionalized by AOT), equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from twilight.kernels.cpu import CpuBackend

    backend = CpuBackend()
    cache = _small_cache()
    cand, counts = _candidates(cache)
    sel = Selection(cand, counts)
    q = torch.randn(2, 6, 32)

    def step(q, cache, sel):
        return backend.quest_page_scores(q, cache), backend.estimate(q, cache, sel, "int4", StepPlan.for_cache(cache))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)  # a graph break raises
    for got, want in zip(compiled(q, cache, sel), step(q, cache, sel), strict=True):
        assert torch.equal(got, want)
    assert counter.frame_count == 1
    called = {n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"}
    assert {torch.ops.twilight_cpu.quest_page_scores.default, torch.ops.twilight_cpu.int4_scores.default} <= called
    torch._dynamo.reset()


def test_compiled_token_update_and_top_p_attend_match_eager(ops):
    """The in-place token update and top-p + attention (its union's width known only at run time) compiled whole:
    the cache's buffers written as eagerly, the same outputs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from twilight.kernels.cpu import CpuBackend

    backend = CpuBackend()
    caches = [_small_cache() for _ in range(2)]  # identical
    k, v = torch.randn(2, 2, 1, 32) * 3, torch.randn(2, 2, 1, 32)
    for c in caches:
        c.append(k, v)
    compiled_cache, eager_cache = caches
    before = compiled_cache.k_qparams.clone(), compiled_cache.page_bounds.clone()
    update = backend.token_updater(compiled_cache)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(update, backend=counter, fullgraph=True)(compiled_cache, compiled_cache.length - 1)
    backend.token_updater(eager_cache)(eager_cache, eager_cache.length - 1)
    assert counter.frame_count == 1
    assert not torch.equal(compiled_cache.k_qparams, before[0])  # written by the compiled graph...
    assert not torch.equal(compiled_cache.page_bounds, before[1])
    for name in ("k_int4", "k_qparams", "page_bounds"):  # ... as eagerly
        assert torch.equal(getattr(compiled_cache, name), getattr(eager_cache, name)), name

    cache = eager_cache
    cand, counts = _candidates(cache)
    q = torch.randn(2, 6, 32)
    scores = ops.int4_scores(q, cache.k_int4, cache.k_qparams, cand, counts, 32)

    def attend(scores, cand, counts, q, k, v):
        return backend._top_p_attend(scores, cand, counts, 0.85, 32 ** -0.5, q, k, v)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(attend, backend=counter, fullgraph=True)(scores, cand, counts, q, cache.k, cache.v)
    want = attend(scores, cand, counts, q, cache.k, cache.v)
    assert counter.frame_count == 1
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    torch._dynamo.reset()


def test_a_failed_build_raises_backend_unavailable_with_the_reason(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'twilight_cpu_kernels': no c++ here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(BackendUnavailableError, match="building the cpu kernels .* failed: .*no c\\+\\+ here"):
        cpu_kernels.load.__wrapped__()  # the uncached body
