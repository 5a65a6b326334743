"""4-bit SpGEMV in Triton: estimated ``q·k`` of the candidates from the packed int4 K cache.

``int4_scores(q, cache, sel) -> [B, Hq, K_max]`` float32 reads, for each candidate token, its ``D`` codes (tiled
layout of ``twilight.quant``: byte ``[tile, d, c % 32]``, low nibble for ``c < 32``) and its ``(scale, mid)``,
and scores it against every query head of its kv-head's GQA group:

    q·k ≈ scale * (q · (code - 8)) + mid * sum(q)

One program handles ``BLOCK_N`` candidate slots of one (batch, kv-head) row (grid ``(B * Hkv, cdiv(K, BLOCK_N))``),
``BLOCK_D`` channels at a time; the codes are unpacked in registers to ``code - 8`` exactly (OR-ed into the
mantissa of a float, no integer-to-float conversion).

**Loads.** For a fixed channel the bytes of the 32 tokens of a half tile are contiguous, and consecutive threads
read consecutive candidates. When the valid slots of every 16-slot group of the block are (a prefix of) a
16-aligned run of consecutive positions (whole pages of 16 tokens or more, as Quest's selection and full-range
selections without left padding give) each thread reads a group's 16 bytes of a channel with one 128-bit load (on
a 16-byte aligned cache, which Triton's pointer specialisation checks); otherwise (any other candidates, e.g. runs
shifted by a partial first page) each byte is gathered on its own. The check is per block, at run time, from the
indices (no host read); both branches compute the same numbers.

**Two code paths** (``USE_DOT``), the same numbers up to float32 summation order:

- tensor cores: ``scores^T [BLOCK_N, G_DOT] += (code - 8)^T @ q^T`` per block of channels (``tl.dot`` in the
  queries' fp16/bf16, where codes minus 8 are exact; float32 queries would take IEEE float32 FMAs), the group
  padded to ``G_DOT = max(16, next_pow2(G))`` query heads; unrolled over the channels, so that with
  ``BLOCK_D = D`` every code load of the block is in flight at once;
- FMA: ``acc [G_FMA, BLOCK_D, BLOCK_N] += q[:, :, None] * (code - 8)[None]`` in float32 (IEEE products whatever
  the queries' dtype), reduced over the channels once at the end, the code loads pipelined a few steps ahead; no
  padding of the group to 16 (``G_FMA = min(next_pow2(G), 4)`` query heads per pass, more passes over the same
  codes when ``G > 4``).

**Autotuning.** On a GPU ``int4_scores`` launches through ``triton.autotune`` over ``CONFIGS`` (candidates per
program, channels per step, warps, path; float32 queries try the FMA configs only), keyed on ``G``, ``D``, the
power of two at or above the candidate width ``K`` (not ``K``: it grows every decode step for some selectors)
and the one at or above the row count ``B * Hkv``, and the tensors' dtypes. The first call for a key compiles and
times every config (host synchronisations, that once; the kernel writes only its output, so the timing runs
leave nothing to restore); later calls launch the chosen config directly, without host reads and CUDA-graph
capturable. Under the Triton interpreter (``TRITON_INTERPRET=1``) ``INTERPRETER_CONFIG`` is launched as is;
``launch(q, cache, sel, config)`` runs any single config (the tests run each of ``CONFIGS``). ``_int4_spgemv_kernel``
keeps the original kernel signature (the tensor-core path with explicit block sizes) for the compile check.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twilight.cache import LayerCache
from twilight.kernels._validate import check_int4_cache, check_q, check_selection, next_pow2
from twilight.kernels.triton._common import dot_in_f32, interpreting, launch_guard
from twilight.quant import INT4_TILE
from twilight.selection import Selection

__all__ = ["int4_scores", "CONFIGS", "INTERPRETER_CONFIG", "launch"]

assert INT4_TILE == 64  # the kernel hard-codes the tile geometry (check_int4_cache checks the cache's)

_G_FMA_MAX = 4  # query heads per pass of the FMA path (a thread holds G_FMA * 16 float32 accumulators)
_FMA_STAGES = tl.constexpr(4)  # pipeline depth of the FMA path's channel loop (code loads in flight per thread)
_RUN = tl.constexpr(16)  # slots per run that one vector load reads (16 tokens: 16 bytes of a channel)


def _config(block_n: int, block_d: int, num_warps: int, use_dot: bool) -> triton.Config:
    # num_stages=1: the tensor-core path's channel loop is unrolled; the FMA path's sets its own pipeline depth.
    return triton.Config({"BLOCK_N": block_n, "BLOCK_D": block_d, "USE_DOT": use_dot}, num_warps=num_warps,
                         num_stages=1)


#: What the autotuner chooses from (``BLOCK_D`` is clamped to the head dim at launch).
#:
#: Tensor cores, all channels in one step (``BLOCK_D = 128``: every code load in flight at once) or two: 64
#: candidates per program for small batches (more programs to spread over the SMs), 128 for large ones (each
#: program's fixed cost, the indices, count, ``(scale, mid)`` and queries, over more candidates), 256 with 8 warps;
#: 128 x 64 channels, half the shared memory and registers of the one-step 128 x 128.
#:
#: FMA (float32 queries, and groups of 1 or 2 where most of a 16-row MMA is padding): sized so that each thread
#: holds 16 candidates (one 128-bit load) of one channel per step, ``(BLOCK_N / 16) * BLOCK_D = 32 * num_warps``;
#: fewer channels per step (less cross-thread reduction at the end) for more candidates per program: 512 x 4 and
#: 256 x 8 with 4 warps, 128 x 16 (more programs for small batches), 512 x 8 with 8 warps.
CONFIGS: tuple[triton.Config, ...] = (
    _config(64, 128, 4, True),
    _config(128, 128, 4, True),
    _config(256, 128, 8, True),
    _config(128, 64, 4, True),
    _config(512, 4, 4, False),
    _config(256, 8, 4, False),
    _config(128, 16, 4, False),
    _config(512, 8, 8, False),
)
#: The one config launched under the Triton interpreter (no autotuning there).
INTERPRETER_CONFIG: triton.Config = CONFIGS[1]


@triton.jit
def _unpack(byte, shift, DTYPE: tl.constexpr):
    """``code - 8`` as ``DTYPE`` (exact) for the nibble of each ``byte`` at ``shift`` (0 or 4), without an
    integer-to-float conversion: the code is OR-ed into the mantissa of ``1024.0`` (fp16), ``128.0`` (bf16) or
    ``2**23`` (float32, then rounded to ``DTYPE``: exact)."""
    code = (byte.to(tl.int32) >> shift) & 0xF
    if DTYPE == tl.float16:
        return (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    elif DTYPE == tl.bfloat16:
        return (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
    else:
        return ((code | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0).to(DTYPE)


@triton.jit
def _load_codes(base, d0, D: tl.constexpr, BLOCK_D: tl.constexpr, AXES: tl.constexpr):
    """Code bytes of channels ``d0 .. d0 + BLOCK_D`` of the candidates at ``base [BLOCK_N]`` (channel ``d`` of a
    candidate is ``32 * d`` bytes after its channel 0): ``[BLOCK_D, BLOCK_N]`` (``AXES == 2``) or
    ``[1, BLOCK_D, BLOCK_N]``."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    if AXES == 2:
        return tl.load(base[None, :] + offs_d[:, None] * 32, mask=(offs_d < D)[:, None], other=0)
    else:
        return tl.load(base[None, None, :] + offs_d[None, :, None] * 32, mask=(offs_d < D)[None, :, None], other=0)


@triton.jit
def _dot_pass(q_ptr, base, shift, q_rows, g_ok, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    """``([BLOCK_G, BLOCK_N], [BLOCK_G, 1])``: sums ``q · (code - 8)`` on the tensor cores, and ``sum(q)``, for
    the candidates at ``base [BLOCK_N]`` (channel-0 bytes) with nibble ``shift``."""
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    qsum = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    # Unrolled: with BLOCK_D = D (one step) every code load of the block is in flight at once; loads of a later
    # step wait for the shared-memory exchange of the previous one.
    for d0 in tl.static_range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        qd = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & (offs_d < D)[None, :],
                     other=0.0)  # [BLOCK_G, BLOCK_D], loaded first: it does not wait for the indices
        byte = _load_codes(base, d0, D, BLOCK_D, 2)
        qsum += qd.to(tl.float32)
        if DOT_F32:  # IEEE float32 products (float32 queries; the interpreter)
            vals = _unpack(byte, shift[None, :], tl.float32)
            acc = tl.dot(tl.trans(vals), tl.trans(qd.to(tl.float32)), acc, input_precision="ieee")
        else:
            vals = _unpack(byte, shift[None, :], q_ptr.dtype.element_ty)
            acc = tl.dot(tl.trans(vals), tl.trans(qd), acc)
    return tl.trans(acc), tl.sum(qsum, axis=1)[:, None]


@triton.jit
def _fma_pass(q_ptr, base, shift, q_rows, g_ok, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Same as ``_dot_pass`` with float32 FMAs (no padding of the group to 16)."""
    # Three dimensions, the codes loaded as [1, BLOCK_D, BLOCK_N]: the accumulator keeps the codes' (vector-load)
    # layout and each thread sums its own channels; one cross-thread reduction at the end. A loop (not unrolled)
    # with the code loads pipelined a few steps ahead (asynchronous copies on a GPU).
    acc = tl.zeros([BLOCK_G, BLOCK_D, BLOCK_N], dtype=tl.float32)
    qsum = tl.zeros([BLOCK_G, BLOCK_D, 1], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=_FMA_STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        qd = tl.load(q_ptr + q_rows[:, None, None] * D + offs_d[None, :, None],
                     mask=g_ok[:, None, None] & (offs_d < D)[None, :, None], other=0.0).to(tl.float32)
        byte = _load_codes(base, d0, D, BLOCK_D, 3)
        qsum += qd
        acc += qd * _unpack(byte, shift[None, None, :], tl.float32)
    return tl.sum(acc, axis=1), tl.sum(qsum, axis=1)


@triton.jit
def _score_pass(q_ptr, out_ptr, base, shift, scale, mid, n_ok, offs_n, row, g0, G, K,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """Scores of query heads ``g0 .. g0 + BLOCK_G`` of the group for one block of candidates, stored."""
    offs_g = g0 + tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    q_rows = row * G + offs_g
    if USE_DOT:
        acc, qsum = _dot_pass(q_ptr, base, shift, q_rows, g_ok, D, BLOCK_D, BLOCK_G, BLOCK_N, DOT_F32)
    else:
        acc, qsum = _fma_pass(q_ptr, base, shift, q_rows, g_ok, D, BLOCK_D, BLOCK_G, BLOCK_N)
    if not USE_DOT:  # loaded late on the FMA path (registers): ``scale``/``mid`` are the pointers
        scale = tl.load(scale, mask=n_ok, other=0.0)
        mid = tl.load(mid, mask=n_ok, other=0.0)
    est = acc * scale[None, :] + qsum * mid[None, :]
    est = tl.where(n_ok[None, :], est, float("-inf"))
    tl.store(out_ptr + q_rows.to(tl.int64)[:, None] * K + offs_n[None, :], est,
             mask=g_ok[:, None] & (offs_n < K)[None, :])


@triton.jit
def _score_rows(q_ptr, out_ptr, base, shift, scale, mid, n_ok, offs_n, row, G, K,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """Scores of one block of candidates for every query head of the group: one pass on the tensor cores
    (``BLOCK_G >= G``), passes of ``BLOCK_G`` heads on the FMA path."""
    if USE_DOT:
        _score_pass(q_ptr, out_ptr, base, shift, scale, mid, n_ok, offs_n, row, 0, G, K,
                    D, BLOCK_D, BLOCK_N, BLOCK_G, True, DOT_F32)
    else:
        for g0 in range(0, G, BLOCK_G):
            _score_pass(q_ptr, out_ptr, base, shift, scale, mid, n_ok, offs_n, row, g0, G, K,
                        D, BLOCK_D, BLOCK_N, BLOCK_G, False, False)


@triton.jit
def _load_candidates(idx_ptr, row, offs_n, K):
    """``(idx, prev)``: each slot's position and its predecessor's (for the run check); 0 outside the row."""
    idx_row = idx_ptr + row.to(tl.int64) * K
    in_k = offs_n < K
    idx = tl.load(idx_row + offs_n, mask=in_k, other=0)
    prev = tl.load(idx_row + offs_n - 1, mask=in_k & (offs_n > 0), other=0)
    return idx, prev


@triton.jit
def _runs(idx, prev, offs_n, count):
    """``(idx, all_runs)``: the positions to read, padding slots (``>= count``) replaced by tokens 0..15 (in
    bounds whatever they held), and whether the valid slots of each 16-slot group (``offs_n`` from a multiple of
    16) are a prefix of a 16-aligned run: ``idx[slot] == 16 * page + lane``. A vector load then reads the group's
    valid codes from its first slot's 16 aligned bytes (a wholly padded group's: token 0's); its padding slots
    read other codes of those 16 bytes, and score ``-inf`` anyway."""
    lane = offs_n % _RUN
    valid = offs_n < count
    is_run = tl.where(lane == 0, idx % _RUN == 0, idx == prev + 1)  # a valid slot's predecessor is valid
    all_runs = tl.min((is_run | ~valid).to(tl.int32), axis=0) == 1
    return tl.where(valid, idx, lane), all_runs


@triton.jit
def _int4_scores_body(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    row = tl.program_id(0)  # b * Hkv + h
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    idx, prev = _load_candidates(idx_ptr, row, offs_n, K)  # in flight with the count
    count = tl.load(count_ptr + row)
    if n0 < count:
        n_ok = offs_n < count
        idx, all_runs = _runs(idx, prev, offs_n, count)
        tile = idx // 64
        col = idx % 64
        # Channel 0 of a candidate is byte [tile, 0, col % 32] of the row's packed tiles: tile_off + lo.
        tile_off = row.to(tl.int64) * (cap * (D // 2)) + tile.to(tl.int64) * (32 * D)
        lo = col % 32
        shift = (col // 32) * 4  # high nibble for tokens 32..63 of a tile
        qp = qparams_ptr + (row.to(tl.int64) * cap + idx) * 2
        if USE_DOT:
            scale = tl.load(qp, mask=n_ok, other=0.0)
            mid = tl.load(qp + 1, mask=n_ok, other=0.0)
        else:
            scale = qp
            mid = qp + 1
        if all_runs:
            # Each 16-slot group is 16 consecutive bytes per channel, at a multiple of 16 (the row's tiles are too:
            # cap is a multiple of 64): one 128-bit load per group and channel when the cache is 16-byte aligned
            # (Triton specialises the pointer argument on it). The hints mark the op that makes their operand:
            # the offsets are summed here, apart from the gather's.
            byte0 = tl.max_contiguous(tl.multiple_of(tile_off + lo, _RUN), _RUN)
            _score_rows(q_ptr, out_ptr, packed_ptr + byte0, shift, scale, mid, n_ok, offs_n, row, G, K,
                        D, BLOCK_D, BLOCK_N, BLOCK_G, USE_DOT, DOT_F32)
        else:
            byte0 = tile_off + lo
            _score_rows(q_ptr, out_ptr, packed_ptr + byte0, shift, scale, mid, n_ok, offs_n, row, G, K,
                        D, BLOCK_D, BLOCK_N, BLOCK_G, USE_DOT, DOT_F32)
    else:
        for g0 in range(0, G, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            tl.store(out_ptr + (row * G + offs_g).to(tl.int64)[:, None] * K + offs_n[None, :],
                     tl.full([BLOCK_G, BLOCK_N], float("-inf"), tl.float32),
                     mask=(offs_g < G)[:, None] & (offs_n < K)[None, :])


@triton.jit(do_not_specialize=["K_BUCKET", "ROW_BUCKET"])
def _int4_scores_kernel(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap, K_BUCKET, ROW_BUCKET,
                        D: tl.constexpr, G_DOT: tl.constexpr, G_FMA: tl.constexpr, DOT_F32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr):
    """The launched kernel: grid ``(B * Hkv, cdiv(K, BLOCK_N))``. ``K_BUCKET``/``ROW_BUCKET`` (unused here) are
    the autotuning key's bucketed sizes; ``G_DOT``/``G_FMA``: query heads per pass of each path."""
    if USE_DOT:
        _int4_scores_body(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap,
                          D, BLOCK_D, BLOCK_N, G_DOT, True, DOT_F32)
    else:
        _int4_scores_body(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap,
                          D, BLOCK_D, BLOCK_N, G_FMA, False, False)


@triton.jit
def _int4_spgemv_kernel(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_F32: tl.constexpr):
    """The tensor-core path with explicit block sizes, under this kernel's original signature (what
    ``tests/kernels/triton_compile_check.py`` compiles); ``int4_scores`` launches ``_int4_scores_kernel``."""
    _int4_scores_body(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap,
                      D, BLOCK_D, BLOCK_N, BLOCK_G, True, DOT_F32)


def _fit(config: triton.Config, D: int) -> triton.Config:
    """``config`` with ``BLOCK_D`` at most the head dim rounded up to a power of two (at least 16 on the tensor
    cores, ``tl.dot``'s smallest reduction)."""
    kw = dict(config.kwargs)
    kw["BLOCK_D"] = min(kw["BLOCK_D"], max(next_pow2(D), 16 if kw["USE_DOT"] else 1))
    return triton.Config(kw, num_warps=config.num_warps, num_stages=config.num_stages)


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's candidates for one launch: each config fitted to the head dim (``_fit``, duplicates
    dropped); with float32 queries (``DOT_F32``) only the FMA configs (their tensor-core variant would be IEEE
    float32 FMAs on a group padded to 16)."""
    out, seen = [], set()
    for c in configs:
        if kwargs["DOT_F32"] and c.kwargs["USE_DOT"]:
            continue
        c = _fit(c, kwargs["D"])
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


_int4_scores_tuned = triton.autotune(list(CONFIGS), key=["G", "D", "K_BUCKET", "ROW_BUCKET"],
                                     prune_configs_by={"early_config_prune": _prune_configs})(_int4_scores_kernel)


def _launch_args(q: torch.Tensor, cache: LayerCache, sel: Selection, out: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel's arguments but the config's: positional (contiguous inputs) and shape constexprs."""
    B, Hkv, D = cache.batch, cache.num_kv_heads, cache.head_dim
    G, K = q.shape[1] // Hkv, sel.k_max
    args = (q.contiguous(), cache.k_int4, cache.k_qparams, sel.indices.contiguous(), sel.counts.contiguous(), out,
            G, K, cache.capacity, next_pow2(K), next_pow2(B * Hkv))
    meta = {"D": D, "G_DOT": max(16, next_pow2(G)), "G_FMA": min(next_pow2(G), _G_FMA_MAX),
            "DOT_F32": dot_in_f32(q.dtype)}
    return args, meta


def launch(q: torch.Tensor, cache: LayerCache, sel: Selection, config: triton.Config) -> torch.Tensor:
    """``int4_scores`` with one given config (one of ``CONFIGS``, say), no autotuning: how the tests run every
    config, and how ``int4_scores`` launches under the interpreter. Same checks and result as ``int4_scores``."""
    out = _prepare(q, cache, sel)
    if sel.k_max == 0:
        return out
    args, meta = _launch_args(q, cache, sel, out)
    config = _fit(config, cache.head_dim)
    with launch_guard(q):
        _int4_scores_kernel[(cache.batch * cache.num_kv_heads, triton.cdiv(sel.k_max, config.kwargs["BLOCK_N"]))](
            *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def _prepare(q: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """Checks the inputs; returns the (uninitialised) output ``[B, Hq, K_max]`` float32."""
    G = check_q(q, cache)
    check_selection(sel, cache)
    check_int4_cache(cache)
    if cache.capacity % INT4_TILE:
        raise ValueError(f"the int4 cache's capacity ({cache.capacity}) must be a multiple of {INT4_TILE}")
    return torch.empty(cache.batch, cache.num_kv_heads * G, sel.k_max, dtype=torch.float32, device=q.device)


def int4_scores(q: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """Approximate ``q·k`` of each query head for its kv-head's candidates, from the int4 K cache.

    Args:
        q: ``[B, Hq, D]`` fp32/fp16/bf16 (``Hq`` a multiple of ``Hkv``; query head ``h * G + g`` belongs to
            kv-head ``h``).
        cache: a ``LayerCache`` with ``quant_bits=4`` (``k_int4 [B, Hkv, cap, D // 2]`` uint8 and
            ``k_qparams [B, Hkv, cap, 2]`` float32).
        sel: candidates, ``indices [B, Hkv, K_max]`` int32 and ``counts [B, Hkv]`` int32.
    Returns:
        ``[B, Hq, K_max]`` float32 raw dot products (not multiplied by the softmax scale), ``-inf`` at slots
        ``>= counts`` — the contract of ``twilight.estimate.estimate_scores(..., "int4")``.

    The first call for a new (``G``, ``D``, power of two of ``K_max`` and of ``B * Hkv``, dtypes) on a GPU
    autotunes (times every config of ``CONFIGS``); later ones launch the chosen config without host reads.

    Example::

        >>> cache = LayerCache(1, 2, 128, dtype=torch.float16, device="cuda")
        >>> cache.append(*torch.randn(2, 1, 2, 1000, 128, dtype=torch.float16, device="cuda"))
        >>> sel = Selection.full(1, 2, 1000, device="cuda")
        >>> int4_scores(torch.randn(1, 8, 128, dtype=torch.float16, device="cuda"), cache, sel).shape
        torch.Size([1, 8, 1000])
    """
    if interpreting():
        return launch(q, cache, sel, INTERPRETER_CONFIG)
    out = _prepare(q, cache, sel)
    if sel.k_max == 0:
        return out
    args, meta = _launch_args(q, cache, sel, out)
    rows = cache.batch * cache.num_kv_heads
    with launch_guard(q):
        _int4_scores_tuned[lambda c: (rows, triton.cdiv(sel.k_max, c["BLOCK_N"]))](*args, **meta)
    return out
