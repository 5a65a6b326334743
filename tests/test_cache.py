"""twilight.cache.LayerCache: consistency of every derived structure under random append sequences."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twilight.cache import LayerCache, quantize_labels
from twilight.quant import INT4_TILE, int4_codes, int4_params, quantize_int8, unpack_int4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _brute_page_bounds(keys: torch.Tensor, start: torch.Tensor, page_size: int):
    """Per page, per channel, exact max and min of the valid keys; ``has`` marks pages with a valid token.
    keys ``[B, H, L, D]`` -> ``hi, lo [B, H, P, D]`` float64, ``has [B, P]``, ``P = ceil(L / page_size)``.

    Each sequence is paged as it would be alone: its valid keys ``[start, L)`` cut into runs of ``page_size``
    from the first, the run ``j`` stored as page ``start // page_size + j`` (pages before are left padding)."""
    B, H, L, D = keys.shape
    P = -(-L // page_size)
    hi = torch.full((B, H, P, D), float("-inf"), dtype=torch.float64)
    lo = torch.full((B, H, P, D), float("inf"), dtype=torch.float64)
    has = torch.zeros(B, P, dtype=torch.bool)
    for b in range(B):
        s = int(start[b])
        for j, p0 in enumerate(range(s, L, page_size)):
            run = keys[b, :, p0:min(p0 + page_size, L)].double()  # [H, n, D]
            page = s // page_size + j
            hi[b, :, page], lo[b, :, page], has[b, page] = run.amax(1), run.amin(1), True
    return hi, lo, has


def _hand_label_levels(x: torch.Tensor, bits: int):
    """Per-token min-max quantization of label vectors ``x [..., C]``, written out independently in float64:
    ``(dequantized values, near_tie)``, where ``near_tie`` marks entries so close to a rounding tie that float32
    arithmetic (relative error a few eps of the level ``t <= 2**bits - 1``) may round them the other way."""
    x = x.double()
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    levels = 2 ** bits - 1
    step = (hi - lo).clamp_min(1e-9) / levels
    t = (x - lo) / step
    near_tie = ((t - torch.floor(t)) - 0.5).abs() < 1e-4 + 8 * torch.finfo(torch.float32).eps * levels
    return lo + torch.floor(t + 0.5) * step, near_tie


def _labels_match(got: torch.Tensor, labels: torch.Tensor, bits: int) -> bool:
    """``got`` (a cache's ``k_label``) is the quantization of ``labels`` up to float32 arithmetic (a few ulps of
    the token's largest label, far below one step) and the rounding to ``got``'s dtype."""
    ref, near_tie = _hand_label_levels(labels, bits)
    ref = ref.to(got.dtype).double()
    tol = torch.finfo(got.dtype).eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * \
        labels.double().abs().amax(-1, keepdim=True)
    return bool((((got.double() - ref).abs() <= tol) | near_tie).all())


def check_cache(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
    """Everything the cache holds agrees with a fresh computation from the concatenated ``k, v``."""
    cache.update_derived()  # a lazy cache brings its derived structures up to date here
    L = k.shape[2]
    assert cache.length == L
    assert cache.capacity >= L
    assert cache.quant_bits != 4 or cache.capacity % INT4_TILE == 0  # whole int4 tiles
    assert not cache.keep_page_bounds or cache.capacity % cache.page_size == 0  # whole pages
    assert torch.equal(cache.keys(), k) and torch.equal(cache.values(), v)
    assert cache.keys().dtype == cache.dtype
    assert cache.lengths().tolist() == [max(L - int(s), 0) for s in start]
    assert cache.num_pages == -(-L // cache.page_size)
    if L == 0:
        return
    if cache.quant_bits == 4:
        qp = int4_params(k)
        assert torch.equal(cache.k_qparams[:, :, :L], qp)
        blk = cache.int4_block
        codes = unpack_int4(cache.k_int4[:, :, :-(-L // blk) * blk], blk)[:, :, :L]
        assert torch.equal(codes, int4_codes(k, qp))
    elif cache.quant_bits == 8:
        codes, qp = quantize_int8(k)
        assert torch.equal(cache.k_int8[:, :, :L], codes)
        assert torch.equal(cache.k_qparams[:, :, :L], qp)
    if cache.keep_page_bounds:
        hi, lo, has = _brute_page_bounds(k, start, cache.page_size)
        bounds = cache.page_bounds[:, :, :cache.num_pages]
        assert bounds.dtype == cache.bounds_dtype
        c_hi, c_lo = bounds[:, :, :, 0], bounds[:, :, :, 1]
        sel = has.view(cache.batch, 1, -1, 1).expand_as(hi)
        # bounds bound the exact values ...
        assert bool((c_hi.double() >= hi)[sel].all()), "page max below a key"
        assert bool((c_lo.double() <= lo)[sel].all()), "page min above a key"
        # ... and are within two steps of the tightest such values of the bounds dtype (outward rounding, not
        # padding or stale tokens)
        up = torch.tensor(float("inf"), dtype=bounds.dtype)
        down = torch.tensor(float("-inf"), dtype=bounds.dtype)
        assert bool((torch.nextafter(torch.nextafter(c_hi, down), down).double() < hi)[sel].all()), "page max loose"
        assert bool((torch.nextafter(torch.nextafter(c_lo, up), up).double() > lo)[sel].all()), "page min loose"
    if cache.label_channels is not None:
        idx = cache.label_channels.view(1, cache.num_kv_heads, 1, -1).expand(cache.batch, -1, L, -1)
        labels = torch.gather(k, 3, idx)
        if cache.label_bits is None:
            assert torch.equal(cache.k_label[:, :, :L], labels)
        else:
            assert _labels_match(cache.k_label[:, :, :L], labels, cache.label_bits), \
                "k_label is not the per-token min-max quantization of the labels"


@st.composite
def cache_scenarios(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    quant = draw(st.sampled_from([4, 8, None]))
    head_dim = draw(st.sampled_from([2, 4, 6, 16] if quant == 4 else [1, 3, 4, 16]))
    page_size = draw(st.one_of(st.sampled_from([1, 16, 64]), st.integers(1, 64)))
    dtype = draw(st.sampled_from(DTYPES))
    appends = draw(st.lists(st.one_of(st.just(1), st.integers(0, 200)), min_size=1, max_size=8))
    if draw(st.integers(0, 4)) == 0:  # sometimes a bulk append crossing the cache's 2048-token update chunks
        appends.insert(draw(st.integers(0, len(appends))), draw(st.integers(1900, 2300)))
    total = sum(appends)
    start = draw(st.lists(st.integers(0, total + 2), min_size=batch, max_size=batch))
    start_mode = draw(st.sampled_from(["init", "later", "none"]))
    seed = draw(st.integers(0, 2 ** 16))
    label_bits = draw(st.sampled_from([None, None, 1, 2, 4, 8]))
    bounds_dtype = draw(st.sampled_from([None, torch.bfloat16] if dtype == torch.float32 else [None]))
    return batch, heads, head_dim, page_size, quant, dtype, appends, start, start_mode, seed, label_bits, bounds_dtype


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_scenarios())
def test_random_append_sequences(scenario):
    batch, heads, head_dim, page_size, quant, dtype, appends, start, start_mode, seed, label_bits, bounds_dtype = \
        scenario
    g = torch.Generator().manual_seed(seed)
    start_t = torch.tensor(start, dtype=torch.int32)
    label = torch.stack([torch.randperm(head_dim, generator=g)[:max(1, head_dim // 2)] for _ in range(heads)])
    cache = LayerCache(batch, heads, head_dim, dtype=dtype, page_size=page_size, quant_bits=quant,
                       label_channels=label, label_bits=label_bits, start=start_t if start_mode == "init" else None,
                       bounds_dtype=bounds_dtype)
    # Exact bounds by default (the keys' own dtype), whatever the CPU or backend; bf16 only when asked for
    assert cache.bounds_dtype == (bounds_dtype or dtype)
    eff_start = start_t if start_mode == "init" else torch.zeros(batch, dtype=torch.int32)
    ks, vs = [], []
    for i, T in enumerate(appends):
        k = (torch.randn(batch, heads, T, head_dim, generator=g) * (1 + 10 * torch.rand(1, generator=g))).to(dtype)
        v = torch.randn(batch, heads, T, head_dim, generator=g).to(dtype)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
        if start_mode == "later" and i == len(appends) // 2:
            cache.set_start(start_t)
            eff_start = start_t
        check_cache(cache, torch.cat(ks, 2), torch.cat(vs, 2), eff_start)


def test_growth_keeps_old_data_and_is_amortised():
    cache = LayerCache(1, 2, 8, quant_bits=4, page_size=16)
    ks, vs, caps = [], [], []
    for _ in range(700):
        k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
        caps.append(cache.capacity)
    check_cache(cache, torch.cat(ks, 2), torch.cat(vs, 2), torch.zeros(1, dtype=torch.int32))
    # capacity grows geometrically, by a quarter (whole int4 tiles and pages): few reallocations for many one-token
    # appends, and never more than a quarter of the storage spare (plus rounding and one spare granule)
    steps = sorted(set(caps))
    assert len(steps) <= 6
    assert all(1.25 * a <= b <= 1.25 * a + 2 * 64 for a, b in zip(steps, steps[1:], strict=False))


@pytest.mark.parametrize("quant", [4, 8])
def test_bulk_append_across_update_chunks(quant):
    """A bulk append larger than the cache's internal update chunk, at an unaligned offset."""
    cache = LayerCache(1, 1, 4, quant_bits=quant, page_size=48, start=torch.tensor([5]))
    k1, v1 = torch.randn(1, 1, 37, 4), torch.randn(1, 1, 37, 4)
    k2, v2 = torch.randn(1, 1, 4200, 4), torch.randn(1, 1, 4200, 4)
    cache.append(k1, v1)
    cache.append(k2, v2)
    check_cache(cache, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), torch.tensor([5]))


def test_initial_capacity():
    cache = LayerCache(1, 1, 4, initial_capacity=1000, page_size=16)
    assert cache.capacity >= 1000
    cap = cache.capacity
    cache.append(torch.randn(1, 1, 1000, 4), torch.randn(1, 1, 1000, 4))
    assert cache.capacity == cap


def test_zero_length_append_is_noop():
    cache = LayerCache(1, 1, 4)
    cache.append(torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4))
    assert cache.length == 0 and cache.keys().shape == (1, 1, 0, 4)


def test_without_page_bounds_or_quant():
    cache = LayerCache(1, 1, 4, quant_bits=None, keep_page_bounds=False)
    cache.append(torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4))
    for name in ("k_int4", "k_int8", "k_qparams", "page_bounds", "k_label"):
        assert not hasattr(cache, name)
    mem = cache.memory_bytes()
    assert mem["extra"] == 0 and mem["overhead_ratio"] == 0


@pytest.mark.parametrize("dtype,page_size", [(torch.float16, 16), (torch.bfloat16, 64), (torch.float32, 16)])
def test_memory_bytes_overhead(dtype, page_size):
    D = 128
    cache = LayerCache(2, 4, D, dtype=dtype, page_size=page_size, quant_bits=4)
    cache.append(torch.randn(2, 4, 300, D, dtype=dtype), torch.randn(2, 4, 300, D, dtype=dtype))
    mem = cache.memory_bytes()
    n = 2 * 4 * cache.capacity  # token slots
    el = torch.tensor([], dtype=dtype).element_size()
    assert mem["kv"] == 2 * n * D * el
    assert mem["k_int4"] == n * D // 2
    assert mem["k_qparams"] == n * 2 * 4
    assert mem["page_bounds"] == (n // page_size) * 2 * D * el  # exact bounds, in the keys' dtype
    assert mem["extra"] == mem["k_int4"] + mem["k_qparams"] + mem["page_bounds"]
    expected = (D / 2 + 8 + 2 * D * el / page_size) / (2 * D * el)
    assert mem["overhead_ratio"] == pytest.approx(expected)
    # sensible: for half-precision caches with Quest pages of 16, int4 + params + bounds stay near 20% of K/V
    if el == 2 and page_size == 16:
        assert 0.15 < mem["overhead_ratio"] < 0.25
    print(f"overhead ratio ({dtype}, page {page_size}): {mem['overhead_ratio']:.3f}")


def test_int8_memory():
    cache = LayerCache(1, 1, 64, dtype=torch.float16, quant_bits=8, keep_page_bounds=False)
    cache.append(torch.randn(1, 1, 10, 64, dtype=torch.float16), torch.randn(1, 1, 10, 64, dtype=torch.float16))
    mem = cache.memory_bytes()
    assert mem["k_int8"] == cache.capacity * 64
    assert mem["overhead_ratio"] == pytest.approx((64 + 8) / (2 * 64 * 2))


# ---------------------------------------------------------------------------------------------- bad input
def test_constructor_errors():
    with pytest.raises(ValueError, match="page_size"):
        LayerCache(1, 1, 4, page_size=0)
    with pytest.raises(ValueError, match="quant_bits"):
        LayerCache(1, 1, 4, quant_bits=2)
    with pytest.raises(ValueError, match="head_dim"):
        LayerCache(1, 1, 5, quant_bits=4)
    with pytest.raises(ValueError, match="batch"):
        LayerCache(0, 1, 4)
    with pytest.raises(ValueError, match="label_channels"):
        LayerCache(1, 2, 4, label_channels=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="label_channels"):
        LayerCache(1, 2, 4, label_channels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim=4"):
        LayerCache(1, 2, 4, label_channels=torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="head_dim=4"):
        LayerCache(1, 2, 4, label_channels=torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="calibrate_double_sparse"):  # one row per query head under GQA
        LayerCache(1, 2, 4, label_channels=torch.zeros(4, 2, dtype=torch.long))
    for bits in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="label_bits"):
            LayerCache(1, 2, 4, label_channels=torch.zeros(2, 2, dtype=torch.long), label_bits=bits)
    assert LayerCache(1, 2, 4, label_bits=2).label_bits is None  # nothing to quantize without label channels


def test_start_errors():
    cache = LayerCache(2, 1, 4)
    with pytest.raises(ValueError, match="start"):
        cache.set_start(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="start"):
        cache.set_start(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="start"):
        LayerCache(2, 1, 4, start=torch.tensor([0]))


@pytest.mark.parametrize("shape,needle", [
    ((2, 2, 3, 8), "k must be"),   # batch
    ((1, 3, 3, 8), "k must be"),   # heads
    ((1, 2, 3, 7), "k must be"),   # head_dim
    ((1, 2, 8), "k must be"),      # rank
])
def test_append_shape_errors(shape, needle):
    cache = LayerCache(1, 2, 8)
    k = torch.randn(*shape)
    with pytest.raises(ValueError, match=needle):
        cache.append(k, k.clone())
    assert cache.length == 0


def test_append_value_shape_and_dtype_errors():
    cache = LayerCache(1, 2, 8, dtype=torch.float32)
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="v shape"):
        cache.append(k, torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="dtype"):
        cache.append(k.half(), k.half())
    with pytest.raises(ValueError, match="dtype"):
        cache.append(k, k.double())
    assert cache.length == 0


# ---------------------------------------------------------------------------------------------- quantized labels
def test_quantize_labels_matches_a_hand_computation():
    # 2 bits over [-1, 2]: steps of 1.0; 3 bits over [0, 7]: steps of 1.0; a constant vector stays itself
    x = torch.tensor([[-1.0, -0.6, 0.6, 1.49, 2.0], [0.0, 7.0, 3.4, 5.6, 6.51], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert quantize_labels(x[:1], 2).tolist() == [[-1.0, -1.0, 1.0, 1.0, 2.0]]
    assert quantize_labels(x[1:2], 3).tolist() == [[0.0, 7.0, 3.0, 6.0, 7.0]]
    assert quantize_labels(x[2:], 1).tolist() == [[3.0] * 5]
    assert quantize_labels(x, None) is x
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4, 50, 12, generator=g) * 3
    for bits in (1, 2, 3, 4, 8, 16):
        out = quantize_labels(y, bits)
        assert out.dtype == y.dtype and out.shape == y.shape
        assert _labels_match(out, y, bits)
        levels = max(torch.unique(row).numel() for row in out.reshape(-1, 12))
        assert levels <= min(2 ** bits, 12)
    with pytest.raises(ValueError, match="label_bits"):
        quantize_labels(y, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_quantizes_labels_across_appends(dtype):
    """k_label holds the quantized labels whatever the append pattern (bulk past the update chunk, decode)."""
    g = torch.Generator().manual_seed(1)
    B, H, D = 2, 2, 16
    channels = torch.tensor([[1, 5, 9, 14], [0, 2, 3, 15]])
    cache = LayerCache(B, H, D, dtype=dtype, label_channels=channels, label_bits=2)
    ks = [torch.randn(B, H, T, D, generator=g).to(dtype) for T in (2100, 1, 1, 37)]
    for k in ks:
        cache.append(k, k)
    k = torch.cat(ks, 2)
    labels = torch.stack([k[:, h][..., channels[h]] for h in range(H)], 1)  # [B, H, L, 4]
    got = cache.k_label[:, :, :cache.length]
    assert got.dtype == dtype and _labels_match(got, labels, 2)
    assert bool((got == labels).float().mean() < 0.9)  # 2 bits: most labels moved
    assert max(torch.unique(row).numel() for row in got.reshape(-1, 4)) <= 4  # at most 4 levels per token


@pytest.mark.parametrize("int4_block", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_one_token_updates_match_a_fresh_computation(int4_block, dtype):
    """Decode-style appends (one token at a time, derived structures updated in place, lazily or at once) hold
    what a fresh computation from all the keys gives, in both int4 tile layouts, with left padding."""
    torch.manual_seed(3)
    B, H, D, ps = 2, 3, 16, 16
    start = torch.tensor([0, 45])
    k = torch.randn(B, H, 230, D).to(dtype)
    v = torch.randn(B, H, 230, D).to(dtype)
    for lazy in (True, False):
        cache = LayerCache(B, H, D, dtype=dtype, page_size=ps, start=start, int4_block=int4_block, lazy_derived=lazy)
        cache.append(k[:, :, :100], v[:, :, :100])
        for t in range(100, 230):
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            if lazy and t % 7 == 0:
                cache.update_derived()
        check_cache(cache, k, v, start)


def test_cache_rejects_unknown_int4_block():
    with pytest.raises(ValueError, match="int4_block"):
        LayerCache(1, 1, 8, int4_block=16)


@pytest.mark.gpu
def test_cuda_device_gets_its_index():
    """A cache made with ``device="cuda"`` reports the device its tensors are on (``cuda:0``), so that the kernel
    wrappers' device checks accept a query made on ``cuda:0`` (seen failing on an H200 before the cache kept
    ``torch.device("cuda")``, which compares unequal to ``cuda:0``)."""
    c = LayerCache(1, 2, 64, dtype=torch.float16, device="cuda")
    c.append(torch.randn(1, 2, 5, 64, device="cuda:0", dtype=torch.float16),
             torch.randn(1, 2, 5, 64, device="cuda:0", dtype=torch.float16))
    assert c.device == torch.device("cuda", torch.cuda.current_device()) == c.k.device
