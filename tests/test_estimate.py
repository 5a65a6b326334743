"""twilight.estimate: exact / int8 / int4 scores of a Selection's candidates, against exact q·k."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight._tensors import compact, gather_tokens
from twilight.cache import LayerCache
from twilight.contract import StepPlan
from twilight.estimate import _int4_cpu, _int4_unpacked, estimate_scores
from twilight.quant import dequantize_int8, unpack_int4
from twilight.selection import Selection


def _cache(B, Hkv, D, L, quant, start=None, dtype=torch.float32, page_size=16, int4_block=64):
    cache = LayerCache(B, Hkv, D, dtype=dtype, quant_bits=quant, start=start, page_size=page_size,
                       int4_block=int4_block)
    k = (torch.randn(B, Hkv, L, D) * (1 + torch.rand(B, Hkv, L, 1) * 3)).to(dtype)
    cache.append(k, torch.randn(B, Hkv, L, D).to(dtype))
    return cache, k


def _selections(B, Hkv, L, start, g):
    """A variety of Selections over [start, L): full-range, sparse masks (from_mask, with different counts
    per row and padding pointing anywhere), compacted random subsets, an empty row, a single token."""
    pos = torch.arange(L)
    valid = (pos.view(1, 1, -1) >= start.view(-1, 1, 1)).expand(B, Hkv, L)
    out = {"full": Selection.full(B, Hkv, L, start=start)}
    dense_mask = valid & (torch.rand(B, Hkv, L, generator=g) < 0.5)
    out["from_mask_dense"] = Selection.from_mask(dense_mask)
    sparse_mask = torch.zeros(B, Hkv, L, dtype=torch.bool)
    sparse_mask[..., L - 1] = True  # one late token per row, the rest a few random ones
    sparse_mask |= valid & (torch.rand(B, Hkv, L, generator=g) < 0.03)
    out["from_mask_sparse"] = Selection.from_mask(sparse_mask)
    uneven = valid.clone()
    uneven[:, 0, :] &= pos >= L - 3  # row 0: only the last 3 tokens; other rows: everything valid
    out["from_mask_uneven"] = Selection.from_mask(uneven)
    empty = dense_mask.clone()
    empty[0, 0] = False  # one row with no candidate at all
    out["from_mask_empty_row"] = Selection.from_mask(empty)
    perm = torch.argsort(torch.rand(B, Hkv, L, generator=g), -1).to(torch.int32)  # unsorted order
    keep = (perm.long() >= start.view(-1, 1, 1)) & (torch.rand(B, Hkv, L, generator=g) < 0.3)
    idx, counts = compact(perm, keep)
    out["compact_unsorted"] = Selection(idx, counts)
    return out


def _ref_dots(q, k_like, sel):
    """float64 ``q·k`` of every query head with its kv-head's selected rows of ``k_like [B, Hkv, L, D]``;
    ``[B, Hq, K]`` with NaN at padding."""
    B, Hq, D = q.shape
    Hkv = k_like.shape[1]
    G = Hq // Hkv
    out = torch.full((B, Hq, sel.k_max), float("nan"), dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            n = int(sel.counts[b, h])
            rows = k_like[b, h, sel.indices[b, h, :n].long()].double()
            out[b, hq, :n] = rows @ q[b, hq].double()
    return out


def _per_token(q, k, sel, fn):
    """``fn(q_row [D], k_row [D]) -> float`` for every (b, hq, slot); NaN at padding."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.full((B, Hq, sel.k_max), float("nan"), dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            n = int(sel.counts[b, hq // G])
            rows = k[b, hq // G, sel.indices[b, hq // G, :n].long()].double()  # [n, D]
            out[b, hq, :n] = fn(q[b, hq].double(), rows)
    return out


def _check_padding(est, sel, G):
    valid = sel.valid().repeat_interleave(G, dim=1)
    assert bool(torch.isneginf(est[~valid]).all()), "padding slots must be -inf"
    assert bool(torch.isfinite(est[valid]).all())
    return valid


@pytest.mark.parametrize("B,Hkv,G,D,L", [(1, 2, 1, 64, 200), (2, 2, 4, 32, 130), (2, 1, 3, 16, 70)])
def test_exact(B, Hkv, G, D, L):
    start = torch.tensor([0, 9][:B])
    cache, k = _cache(B, Hkv, D, L, None, start=start)
    q = torch.randn(B, Hkv * G, D)
    g = torch.Generator().manual_seed(0)
    for name, sel in _selections(B, Hkv, L, start, g).items():
        est = estimate_scores(q, cache, sel, "exact")
        assert est.shape == (B, Hkv * G, sel.k_max) and est.dtype == torch.float32, name
        valid = _check_padding(est, sel, G)
        ref = _ref_dots(q, k, sel)
        assert torch.allclose(est[valid].double(), ref[valid], rtol=1e-5, atol=1e-4), name


def _bounds(q, k, sel, levels):
    """Per-slot error bound of a per-token min-max quantized estimate: |q|_1 * (max - min) / (2 * levels),
    and the magnitude |q|_1 * max|k| that float rounding scales with."""
    quant = _per_token(q, k, sel, lambda qr, rows: qr.abs().sum() * (rows.amax(-1) - rows.amin(-1)) / (2 * levels))
    mag = _per_token(q, k, sel, lambda qr, rows: qr.abs().sum() * rows.abs().amax(-1))
    return quant, mag


@pytest.mark.parametrize("D", [64, 128, 32, 48, 16])  # 32/64/128: CPU int4 GEMV path; 48/16: portable path
@pytest.mark.parametrize("G", [1, 4])
def test_int4_close_to_exact(D, G):
    B, Hkv, L = 2, 2, 300
    start = torch.tensor([0, 70])
    cache, k = _cache(B, Hkv, D, L, 4, start=start)
    q = torch.randn(B, Hkv * G, D)
    g = torch.Generator().manual_seed(1)
    for name, sel in _selections(B, Hkv, L, start, g).items():
        est = estimate_scores(q, cache, sel, "int4")
        valid = _check_padding(est, sel, G)
        exact = _ref_dots(q, k, sel)
        quant, mag = _bounds(q, k, sel, 15)
        err = (est.double() - exact)[valid]
        bound = (quant * 1.001 + 0.01 * mag + 1e-4)[valid]  # bf16 rounding on the CPU path: ~1% of |q|·|k|
        assert bool((err.abs() <= bound).all()), (name, float((err.abs() - bound).max()))


@pytest.mark.parametrize("D", [64, 128, 16])
def test_int4_paths_match_dequantized_reference(D):
    """Both int4 implementations compute q · dequant(k_int4): the portable one in fp32, the CPU GEMV in bf16."""
    from twilight.estimate import cpu_int4_block

    B, Hkv, G, L = 2, 2, 2, 260
    start = torch.tensor([3, 0])
    block = cpu_int4_block() or 64  # the CPU path reads the GEMV's own layout
    cache, k = _cache(B, Hkv, D, L, 4, start=start, int4_block=block)
    q = torch.randn(B, Hkv * G, D)
    deq = (unpack_int4(cache.k_int4, block).float() - 8) * cache.k_qparams[..., :1] + cache.k_qparams[..., 1:]
    g = torch.Generator().manual_seed(2)
    qg = q.view(B, Hkv, G, D)
    for name, sel in _selections(B, Hkv, L, start, g).items():
        ref = _ref_dots(q, deq[:, :, :L], sel)
        valid = sel.valid().repeat_interleave(G, dim=1)
        mag = _per_token(q, deq[:, :, :L], sel, lambda qr, rows: qr.abs() @ rows.abs().T)
        portable = _int4_unpacked(qg, cache, sel).reshape(B, Hkv * G, -1).double()
        assert bool(((portable - ref).abs() <= 1e-5 * mag + 1e-5)[valid].all()), name
        if D in (32, 64, 128, 256):
            cpu = _int4_cpu(qg, cache, sel).reshape(B, Hkv * G, -1).double()
            assert bool(((cpu - ref).abs() <= 1e-2 * mag + 1e-4)[valid].all()), name


@pytest.mark.parametrize("page_size", [8, 16, 32, 64, 128, 24])
def test_int4_cpu_reads_quest_pages(page_size):
    """Quest's page-major selections (one block per page, or a page's blocks) score like the portable path, in
    every int4 block layout the CPU GEMV may use, with a partial last page."""
    from twilight.config import SelectorConfig
    from twilight.estimate import cpu_int4_block
    from twilight.select import make_selector

    block = cpu_int4_block()
    if block is None:
        pytest.skip("the CPU int4 GEMV reproduces neither layout here")
    B, Hkv, G, D, L = 2, 2, 3, 64, 1001
    cache, k = _cache(B, Hkv, D, L, 4, page_size=page_size, int4_block=block)
    q = torch.randn(B, Hkv * G, D)
    sel = make_selector(SelectorConfig(type="quest", token_budget=300, page_size=page_size))(
        q, cache, StepPlan.for_cache(cache))
    assert sel.page_size == page_size and not sel.is_full_range
    qg = q.view(B, Hkv, G, D)
    ref = _int4_unpacked(qg, cache, sel).double()  # q · dequantized keys, token by token, fp32
    got = _int4_cpu(qg, cache, sel).double()
    valid = sel.valid().unsqueeze(2).expand_as(ref)
    mag = (qg.abs().double() @ k.abs().double().amax(2).transpose(-1, -2)).amax(-1, keepdim=True)  # [B, H, G, 1]
    assert bool(((got - ref).abs() <= 1e-2 * mag + 1e-4)[valid].all())


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), D=st.sampled_from([16, 32, 64]),
       L=st.integers(1, 200), density=st.floats(0.01, 1.0), seed=st.integers(0, 9999))
def test_int4_random_selections(B, Hkv, G, D, L, density, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, L, (B,), generator=g)
    cache = LayerCache(B, Hkv, D, quant_bits=4, start=start)
    k = torch.randn(B, Hkv, L, D, generator=g)
    cache.append(k, torch.randn(B, Hkv, L, D, generator=g))
    q = torch.randn(B, Hkv * G, D, generator=g)
    pos = torch.arange(L).view(1, 1, -1)
    mask = (torch.rand(B, Hkv, L, generator=g) < density) & (pos >= start.view(-1, 1, 1))
    sel = Selection.from_mask(mask)
    est = estimate_scores(q, cache, sel, "int4")
    valid = _check_padding(est, sel, G)
    exact = _ref_dots(q, k, sel)
    quant, mag = _bounds(q, k, sel, 15)
    assert bool(((est.double() - exact).abs() <= quant * 1.001 + 0.01 * mag + 1e-4)[valid].all())


@pytest.mark.parametrize("D", [64, 5])
def test_int8_close_to_exact(D):
    B, Hkv, G, L = 2, 2, 2, 150
    start = torch.tensor([0, 20])
    cache, k = _cache(B, Hkv, D, L, 8, start=start)
    q = torch.randn(B, Hkv * G, D)
    deq = dequantize_int8(cache.k_int8, cache.k_qparams)
    g = torch.Generator().manual_seed(3)
    for name, sel in _selections(B, Hkv, L, start, g).items():
        est = estimate_scores(q, cache, sel, "int8")
        valid = _check_padding(est, sel, G)
        exact = _ref_dots(q, k, sel)
        quant, mag = _bounds(q, k, sel, 255)
        err = (est.double() - exact)[valid]
        assert bool((err.abs() <= (quant * 1.001 + 1e-5 * mag + 1e-4)[valid]).all()), name
        # and it is q · dequant(k_int8) up to fp32 rounding
        ref = _ref_dots(q, deq[:, :, :L], sel)
        assert torch.allclose(est[valid].double(), ref[valid], rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches(dtype):
    cache, k = _cache(1, 2, 64, 100, 4, dtype=dtype)
    q = torch.randn(1, 4, 64).to(dtype)
    sel = Selection.full(1, 2, 100)
    exact = estimate_scores(q, cache, sel, "exact")
    assert torch.allclose(exact.double(), _ref_dots(q, k, sel), rtol=1e-3, atol=1e-3)
    est = estimate_scores(q, cache, sel, "int4")
    quant, mag = _bounds(q, k, sel, 15)
    assert bool(((est.double() - exact.double()).abs() <= quant * 1.001 + 0.01 * mag + 1e-3).all())


def test_gather_tokens():
    store = torch.arange(2 * 3 * 10 * 4).view(2, 3, 10, 4)
    idx = torch.tensor([[[9, 0], [1, 1], [5, 2]], [[0, 3], [8, 8], [7, 6]]], dtype=torch.int32)
    out = gather_tokens(store, idx)
    assert out.shape == (2, 3, 2, 4)
    for b in range(2):
        for h in range(3):
            for j in range(2):
                assert torch.equal(out[b, h, j], store[b, h, idx[b, h, j]])


def test_errors():
    cache4, _ = _cache(1, 2, 16, 70, 4)
    cache_none, _ = _cache(1, 2, 16, 70, None)
    sel = Selection.full(1, 2, 70)
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="int8"):
        estimate_scores(q, cache4, sel, "int8")
    with pytest.raises(ValueError, match="int4"):
        estimate_scores(q, cache_none, sel, "int4")
    with pytest.raises(ValueError, match="estimator.type") as info:
        estimate_scores(q, cache4, sel, "int3")
    assert "exact" in str(info.value) and "int4" in str(info.value)
    for shape in [(1, 3, 16), (2, 4, 16), (1, 4, 8)]:
        with pytest.raises(ValueError, match="q must be"):
            estimate_scores(torch.randn(*shape), cache4, sel, "exact")
    for kind in ("exact", "int4"):
        for bad in (Selection.full(1, 3, 70), Selection.full(2, 2, 70)):
            with pytest.raises(ValueError, match="selection must be"):
                estimate_scores(q, cache4, bad, kind)


def test_cpu_int4_layout_matches_torchs_own_packing():
    """The layout the CPU path hands PyTorch's int4 GEMV equals what PyTorch itself packs on this machine
    (64-token blocks on AVX-512, 32-token blocks on AVX2)."""
    from twilight.estimate import cpu_int4_block
    from twilight.quant import pack_int4

    block = cpu_int4_block()
    assert block in (32, 64), "the CPU int4 GEMV reproduces neither layout: the portable path serves the CPU"
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ours = pack_int4(codes, block)
    torch_packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(ours, torch_packed.view(torch.uint8).reshape(ours.shape))
