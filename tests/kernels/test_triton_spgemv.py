"""Triton int4 SpGEMV against float64 dot products with the dequantized keys, and the torch estimator.

``int4_scores`` launches one fixed config under the interpreter (autotuning on a GPU); ``test_every_config`` runs
each of ``spgemv.CONFIGS`` (both code paths, every block shape) on candidates in page runs (the 128-bit load
branch) and in any order (the byte gather), ``test_runs_check`` the run detection that picks between the two,
``test_unpack`` the nibble unpacking of every byte in each dtype, ``test_autotuning_setup`` what the autotuner is
given, and the slow ``test_compiles_for_sm90`` the compiled kernels' loads (no GPU needed).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_helpers import (
    HAS_CUDA,
    INT4_SCORE_CASES,
    INTERPRET,
    TRITON_DEVICES,
    assert_close,
    int4_reference,
    make_cache,
    random_selection,
)

from twilight.estimate import estimate_scores
from twilight.selection import Selection

spgemv = pytest.importorskip("twilight.kernels.triton.spgemv", reason="needs triton")
import triton  # noqa: E402  (after the skip: triton is there)
import triton.language as tl  # noqa: E402


def page_selection(cache, pages, counts, width=None) -> Selection:
    """Rows of whole 16-token pages (``pages[b][h]``: page numbers, in that order), ``counts [B][Hkv]`` valid slots
    (a partial page where a count is not a multiple of 16); padding slots hold position 1."""
    B, H = len(pages), len(pages[0])
    width = width or max(16 * len(p) for row in pages for p in row)
    idx = torch.ones(B, H, width, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            pos = (torch.tensor(pages[b][h], dtype=torch.int32)[:, None] * 16 + torch.arange(16)).reshape(-1)
            idx[b, h, :pos.numel()] = pos
    return Selection(idx.to(cache.device), torch.tensor(counts, dtype=torch.int32, device=cache.device))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,D,G,counts,start", INT4_SCORE_CASES)
def test_int4_scores(device, dtype, D, G, counts, start):
    cache = make_cache(2, 2, D, length=290, dtype=dtype, device=device, start=start)
    sel = random_selection(cache, counts, width=210, seed=1)
    q = torch.randn(2, 2 * G, D).to(dtype).to(device)
    est = spgemv.int4_scores(q, cache, sel)
    assert est.shape == (2, 2 * G, 210) and est.dtype == torch.float32 and est.device == q.device
    # Exact codes times q (fp16/bf16 products are exact in fp32): only accumulation order differs.
    assert_close(est, int4_reference(q, cache, sel), 1e-4, "int4 SpGEMV vs float64")
    if device == "cpu":  # the torch estimator's CPU path rounds q and its output to bf16
        ref = estimate_scores(q, cache, sel, "int4")
        assert torch.equal(torch.isfinite(ref), torch.isfinite(est))
        finite = torch.isfinite(ref)
        if finite.any():
            assert (est[finite] - ref[finite]).abs().max() <= 2e-2 * ref[finite].abs().max()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_full_selection_and_whole_tiles(device):
    """A full-range selection over several 64-token tiles, both nibbles of every byte."""
    cache = make_cache(1, 2, 64, length=200, dtype=torch.float16, device=device)
    sel = Selection.full(1, 2, 200, device=device)
    q = torch.randn(1, 8, 64).half().to(device)
    assert_close(spgemv.int4_scores(q, cache, sel), int4_reference(q, cache, sel), 1e-4, "full selection")


def _every_config_cases(device):
    """(name, q, cache, sel): both branches (page runs: whole, partial, misaligned; any order), G in {1, 3, 4, 8}
    (the FMA path's second pass), D in {48, 64, 128} (a partial channel block), fp16/bf16/fp32 queries, counts
    below the width, empty rows, blocks past the counts."""
    g = torch.Generator().manual_seed(3)
    cases = []
    cache = make_cache(2, 2, 64, length=300, dtype=torch.float16, device=device, seed=1)
    sel = page_selection(cache, [[[3, 0, 17, 9, 4], [12, 2, 5]], [[16, 1], [6, 7, 8, 10, 11, 13]]],
                         [[80, 41], [0, 96]], width=96)  # 41: a partial page; 0: an empty row
    cases.append(("fp16 D=64 G=4 pages", torch.randn(2, 8, 64, generator=g).half(), cache, sel))
    cache = make_cache(2, 2, 128, length=300, dtype=torch.float32, device=device, start=[0, 37], seed=2)
    sel = random_selection(cache, [[200, 3], [64, 0]], width=210, seed=4)
    cases.append(("fp32 D=128 G=1 any order", torch.randn(2, 2, 128, generator=g), cache, sel))
    cache = make_cache(1, 2, 48, length=200, dtype=torch.bfloat16, device=device, start=[37], seed=3)
    sel = Selection.full(1, 2, 200, device=device, start=cache.start)  # runs from 37: misaligned first block
    cases.append(("bf16 D=48 G=3 runs from 37", torch.randn(1, 6, 48, generator=g).bfloat16(), cache, sel))
    cache = make_cache(1, 2, 128, length=256, dtype=torch.float16, device=device, seed=4)
    sel = page_selection(cache, [[[15, 14, 0, 1, 2, 3, 8, 9], [4, 5, 6, 7, 12, 13]]], [[128, 93]], width=130)
    cases.append(("fp16 D=128 G=8 pages", torch.randn(1, 16, 128, generator=g).half(), cache, sel))
    return [(name, q.to(device), cache, sel) for name, q, cache, sel in cases]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("config", range(len(spgemv.CONFIGS)))
def test_every_config(device, config):
    cfg = spgemv.CONFIGS[config]
    for name, q, cache, sel in _every_config_cases(device):
        est = spgemv.launch(q, cache, sel, cfg)
        assert est.shape == (q.shape[0], q.shape[1], sel.k_max)
        assert_close(est, int4_reference(q, cache, sel), 1e-4, f"{cfg}: {name}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_fixed_signature_kernel(device):
    """``_int4_spgemv_kernel`` (the tensor-core path under the original signature, what the compile check builds)
    computes the same scores."""
    _, q, cache, sel = _every_config_cases(device)[0]
    out = torch.empty(q.shape[0], q.shape[1], sel.k_max, device=device)
    B, H = sel.counts.shape
    spgemv._int4_spgemv_kernel[(B * H, triton.cdiv(sel.k_max, 64))](
        q, cache.k_int4, cache.k_qparams, sel.indices, sel.counts, out, q.shape[1] // H, sel.k_max, cache.capacity,
        D=64, BLOCK_D=64, BLOCK_G=16, BLOCK_N=64, DOT_F32=spgemv.dot_in_f32(q.dtype))
    assert_close(out, int4_reference(q, cache, sel), 1e-4, "fixed-signature kernel")


@triton.jit
def _runs_probe(idx_ptr, count_ptr, out_idx_ptr, flag_ptr, K, W, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    idx, prev = spgemv._load_candidates(idx_ptr, row, offs_n, K)
    idx, all_runs = spgemv._runs(idx, prev, offs_n, tl.load(count_ptr + row))
    tl.store(out_idx_ptr + row * W + offs_n, idx)
    tl.store(flag_ptr + row * tl.num_programs(1) + tl.program_id(1), all_runs.to(tl.int32))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_runs_check(device):
    """The block-wise run detection: true exactly when the valid slots of every 16-slot group are a prefix of a
    16-aligned run of consecutive positions (what a 128-bit load may read); padding slots come back as 0..15."""
    K, BLOCK_N = 80, 32  # 5 groups, 3 blocks (the last one past K)
    pages = (torch.tensor([3, 7, 0, 12, 5])[:, None] * 16 + torch.arange(16)).reshape(-1)
    rows, counts = [], []

    def add(idx, count):
        rows.append(torch.as_tensor(idx, dtype=torch.int32))
        counts.append(count)

    add(pages, 80)  # whole pages
    add(pages, 70)  # a partial last page
    add(torch.cat([pages[:16], torch.arange(8, 24), pages[32:]]), 80)  # a misaligned run in block 0
    swapped = pages.clone()
    swapped[[40, 41]] = swapped[[41, 40]]
    add(swapped, 80)  # two slots swapped in block 1
    add(torch.full((80,), 5), 0)  # no valid slot
    add(torch.randperm(300, generator=torch.Generator().manual_seed(0))[:80], 80)  # any order
    add(torch.cat([torch.arange(32, 64), torch.arange(128, 160), torch.arange(16)]), 80)  # runs of 32, then 16
    add(torch.cat([torch.arange(16, 32), torch.arange(33, 49), pages[32:]]), 79)  # consecutive but misaligned
    idx = torch.stack(rows)
    R = idx.shape[0]
    n_blocks = triton.cdiv(K, BLOCK_N)
    out_idx = torch.full((R, n_blocks * BLOCK_N), -1, dtype=torch.int32, device=device)
    flags = torch.full((R, n_blocks), -1, dtype=torch.int32, device=device)
    _runs_probe[(R, n_blocks)](idx.to(device), torch.tensor(counts, dtype=torch.int32, device=device), out_idx,
                               flags, K, n_blocks * BLOCK_N, BLOCK_N=BLOCK_N)
    out_idx, flags = out_idx.cpu(), flags.cpu()
    for r in range(R):
        slots = torch.arange(n_blocks * BLOCK_N)
        valid = slots < counts[r]
        expect_idx = torch.where(valid, torch.cat([idx[r], torch.zeros(n_blocks * BLOCK_N - K, dtype=torch.int32)]),
                                 slots % 16)
        assert torch.equal(out_idx[r], expect_idx.to(torch.int32)), r
        for blk in range(n_blocks):
            ok = True
            for n in range(blk * BLOCK_N, min((blk + 1) * BLOCK_N, counts[r])):
                ok &= bool(idx[r, n] % 16 == 0) if n % 16 == 0 else bool(idx[r, n] == idx[r, n - 1] + 1)
            assert flags[r, blk] == int(ok), (r, blk)
    assert flags[0].tolist() == [1, 1, 1] and flags[1].tolist() == [1, 1, 1]
    assert flags[2].tolist() == [0, 1, 1] and flags[3].tolist() == [1, 0, 1] and flags[5].tolist() == [0, 0, 0]
    assert flags[6].tolist() == [1, 1, 1] and flags[7].tolist() == [0, 1, 1]


@triton.jit
def _unpack_probe(byte_ptr, out_ptr, DTYPE: tl.constexpr):
    offs = tl.arange(0, 256)
    byte = tl.load(byte_ptr + offs)
    tl.store(out_ptr + offs, spgemv._unpack(byte, 0, DTYPE).to(tl.float32))
    tl.store(out_ptr + 256 + offs, spgemv._unpack(byte, 4, DTYPE).to(tl.float32))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_unpack(device, dtype):
    """``code - 8`` of both nibbles of every byte, exactly, in each dtype the kernels unpack to (the interpreter
    runs the tensor-core path in float32: this is where its fp16/bf16 unpacking is checked)."""
    if dtype == "bfloat16" and device == "cpu":
        pytest.skip("the interpreter's bfloat16 arithmetic is wrong (numpy has no bfloat16)")
    byte = torch.arange(256, dtype=torch.uint8, device=device)
    out = torch.empty(2, 256, device=device)
    _unpack_probe[(1,)](byte, out, DTYPE=getattr(tl, dtype))
    b = byte.cpu().int()
    assert torch.equal(out.cpu(), torch.stack([(b & 15) - 8, (b >> 4) - 8]).float())


def test_autotuning_setup():
    """The autotuner's key is bucketed (not the raw width K), its candidates fit the head dim, float32 queries
    get the FMA configs only; the launch passes the buckets."""
    assert 1 < len(spgemv.CONFIGS) <= 8
    assert {c.kwargs["USE_DOT"] for c in spgemv.CONFIGS} == {True, False}
    assert spgemv.INTERPRETER_CONFIG in spgemv.CONFIGS
    tuned = spgemv._int4_scores_tuned
    assert tuned.keys == ["G", "D", "K_BUCKET", "ROW_BUCKET"] and "K" not in tuned.keys
    assert not tuned.reset_to_zero and not tuned.restore_value  # the kernel writes only its output
    assert tuned.early_config_prune is spgemv._prune_configs
    prune = spgemv._prune_configs
    kept = prune(list(spgemv.CONFIGS), {}, D=128, DOT_F32=False)
    assert len(kept) == len(spgemv.CONFIGS)
    small = prune(list(spgemv.CONFIGS), {}, D=16, DOT_F32=False)
    assert all(c.kwargs["BLOCK_D"] <= 16 for c in small) and len(small) < len(spgemv.CONFIGS)  # duplicates dropped
    assert all(not c.kwargs["USE_DOT"] for c in prune(list(spgemv.CONFIGS), {}, D=128, DOT_F32=True))
    cache = make_cache(2, 2, 64, length=100)
    sel = random_selection(cache, [[50, 3], [64, 0]], width=70)
    args, meta = spgemv._launch_args(torch.randn(2, 6, 64).half(), cache, sel, torch.empty(0))
    assert args[6:] == (3, 70, cache.capacity, 128, 4)  # G, K, cap, K_BUCKET, ROW_BUCKET
    assert meta == {"D": 64, "G_DOT": 16, "G_FMA": 4, "DOT_F32": spgemv.dot_in_f32(torch.float16)}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device and compiled Triton kernels")
def test_autotuned_on_gpu_is_graph_capturable():
    """On a GPU: the first call tunes; later calls (same key, a different K in the same bucket) match the
    reference, and a captured CUDA graph replays the kernel on new queries."""
    cache = make_cache(4, 8, 128, length=2048, dtype=torch.float16, device="cuda")
    pages = [[torch.randperm(128, generator=torch.Generator().manual_seed(b * 8 + h))[:48].tolist()
              for h in range(8)] for b in range(4)]
    sel = page_selection(cache, pages, [[768] * 8] * 4)
    q = torch.randn(4, 32, 128, device="cuda").half()
    assert_close(spgemv.int4_scores(q, cache, sel), int4_reference(q, cache, sel), 1e-4, "tuned")
    sel2 = Selection(sel.indices[..., :700].contiguous(), torch.full_like(sel.counts, 700))  # same K_BUCKET
    assert_close(spgemv.int4_scores(q, cache, sel2), int4_reference(q, cache, sel2), 1e-4, "same bucket")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = spgemv.int4_scores(q, cache, sel)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, int4_reference(q, cache, sel), 1e-4, "graph replay")


_COMPILE_SCRIPT = textwrap.dedent("""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from twilight.kernels.triton import spgemv

    sig = {"q_ptr": "*fp16", "packed_ptr": "*u8", "qparams_ptr": "*fp32", "idx_ptr": "*i32", "count_ptr": "*i32",
           "out_ptr": "*fp32", "G": "i32", "K": "i32", "cap": "i32", "K_BUCKET": "i32", "ROW_BUCKET": "i32"}
    names = list(sig)

    def ptx(config, aligned):
        ce = {"D": 128, "G_DOT": 16, "G_FMA": 4, "DOT_F32": False, **config.kwargs}
        div = [k for k in names if k.endswith("_ptr") and (aligned or k != "packed_ptr")] + ["K", "cap"]
        src = ASTSource(fn=spgemv._int4_scores_kernel, signature=dict(sig, **{k: "constexpr" for k in ce}),
                        constexprs=ce, attrs={(names.index(k),): [["tt.divisibility", 16]] for k in div})
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

    def reads(text):  # (byte loads, 16-byte loads and asynchronous copies)
        wide = len(re.findall(r"ld\\.global[.\\w]*\\.v4\\.", text)) + len(re.findall(r"cp\\.async\\.cg\\.", text))
        return len(re.findall(r"ld\\.global[.\\w]*\\.b8\\b", text)), wide

    for i, config in enumerate(spgemv.CONFIGS):
        b8, wide = reads(ptx(config, True))
        line = f"{i} {b8} {wide}"
        if i in (1, 4):  # one per path: the same config without an aligned cache has no 128-bit code loads
            line += " %d %d" % reads(ptx(config, False))
        print(line)
""")


@pytest.mark.slow
def test_compiles_for_sm90():
    """Every config compiles for sm_90 (the interpreter does not check that) and keeps both branches: the gather
    still reads single bytes (the vector hints of the run branch must not reach it), and, with a 16-byte aligned
    cache, the run branch reads 16 bytes at a time (~20 s, no GPU needed)."""
    import importlib.util

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [list(map(int, line.split())) for line in proc.stdout.split("\n") if line.strip()]
    assert [line[0] for line in lines] == list(range(len(spgemv.CONFIGS))), proc.stdout
    for i, b8, wide, *unaligned in lines:
        assert b8 > 0, f"config {i}: the gather branch lost its byte loads (a leaked vector hint): {proc.stdout}"
        if unaligned:
            assert wide > unaligned[1], f"config {i}: no 128-bit code loads in the run branch: {proc.stdout}"


def test_rejects_bad_inputs():
    cache = make_cache(1, 2, 64, length=50, quant_bits=8)
    sel = Selection.full(1, 2, 50)
    with pytest.raises(ValueError, match="quant_bits=4"):
        spgemv.int4_scores(torch.randn(1, 4, 64).half(), cache, sel)
    cache = make_cache(1, 2, 64, length=50)
    with pytest.raises(ValueError, match="selection must be"):
        spgemv.int4_scores(torch.randn(1, 4, 64).half(), cache, Selection.full(1, 3, 50))
