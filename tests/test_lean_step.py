"""The lean decode step, checked on the CPU: host synchronisations, ops per sparse layer, the dense crossover,
and the torch and triton backends agreeing through the public patch.

- Synchronisations are counted with ``twilight.diagnostics.count_ops`` over a whole patched decode step of a tiny
  Llama. The fixed-shape path (``pipeline.host_reads = False``: what a GPU runs, every shape host-known) must make
  none, on the torch and the triton backend. On the CPU the torch backend reads counts back on purpose (reading
  host memory waits for nothing): a bounded number per sparse layer (``CPU_HOST_READS_PER_SPARSE_LAYER``), each
  sizing the work to the tokens kept, and none once ``host_reads`` is off.
- Ops per sparse layer per step (the token's cache update and the layer's decode) have stated bounds.
- Below ``dense_below`` every layer decodes densely (exactly dense attention); at and above it, sparsely.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import twilight
from twilight.diagnostics import count_ops
from twilight.integrations import hf
from twilight.kernels.reference import TorchBackend
from twilight.pipeline import TwilightPipeline

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET or twilight.available_backends("cpu")["triton"] is not None,
    reason="the triton backend on the CPU needs triton and TRITON_INTERPRET=1"))]

# How many counts the torch backend may read back per sparse layer and decode step on the CPU (each sizes the work
# to the tokens actually kept: the selection's width, the estimate's rows, top-p's kept set, the attention's rows).
CPU_HOST_READS_PER_SPARSE_LAYER = 12  # 35 in 3 layers today

# Ops (torch ops + Triton launches) per sparse layer per decode step: the new token's cache update and the layer's
# decode (select, estimate, prune, attend), for the shapes of `_layer_step` (batch 2, 8 query / 2 kv heads).
OPS_BOUND = {"triton": 12,  # 2 copies (K and V into the cache) + 9 launches today
             "torch-fixed": 210,  # the GPU's torch path: radix top-p over whole rows, padded attention
             "torch-cpu": 250}  # the CPU's: int4 GEMV per (batch, kv-head), attention per (batch, kv-head) row


def tiny_llama(layers=3, heads=8, kv_heads=2, dim=64, seed=7):
    cfg = LlamaConfig(vocab_size=300, hidden_size=heads * dim, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def sparse(backend, budget=64, **extra):
    return {"selector": {"type": "quest", "token_budget": budget, "page_size": 16}, "estimator": {"type": "int4"},
            "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [], "dense_below": 0, "backend": backend,
            **extra}


def _decode_steps(model, ids, steps):
    """Prefill ``ids`` and decode ``steps`` tokens greedily with a manual loop; returns (cache, last logits, fn)."""
    cache = hf.make_cache(model)
    keyword = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    kw = {keyword: cache, "use_cache": True}
    with torch.no_grad():
        logits = model(input_ids=ids, **kw).logits
        for _ in range(steps):
            logits = model(input_ids=logits[:, -1:].argmax(-1), **kw).logits

    def step(tokens):
        with torch.no_grad():
            return model(input_ids=tokens, **kw).logits

    return cache, logits, step


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_shape_decode_step_makes_no_host_sync(backend):
    model = tiny_llama()
    twilight.patch(model, sparse(backend))
    ids = torch.randint(3, 300, (2, 301))
    cache, logits, step = _decode_steps(model, ids, 2)
    cache.pipeline.host_reads = False  # the path a GPU runs
    nxt = logits[:, -1:].argmax(-1)
    before = hf.engagement(model)["twilight_forwards"]
    with count_ops() as c:
        step(nxt)
    assert hf.engagement(model)["twilight_forwards"] == before + 1  # a decode step, served by Twilight
    assert c.syncs == 0, c.summary()
    assert twilight.budget_stats(model).as_dict()["mean_attended_tokens"] < 80  # and a sparse one


def test_cpu_host_reads_only_where_they_size_the_work():
    model = tiny_llama()
    twilight.patch(model, sparse("torch"))
    cache, logits, step = _decode_steps(model, torch.randint(3, 300, (2, 301)), 2)
    with count_ops() as c:
        step(logits[:, -1:].argmax(-1))
    sparse_layers = 3  # tiny_llama's, none of them dense
    assert 0 < c.syncs <= CPU_HOST_READS_PER_SPARSE_LAYER * sparse_layers, c.summary()  # the CPU path reads counts


def _layer_step(backend, host_reads):
    """Ops of one sparse layer's decode step: the token's cache update and ``pipe.decode``."""
    Hq, Hkv, D = 8, 2, 64
    pipe = TwilightPipeline(sparse(backend, budget=256), num_layers=1, num_q_heads=Hq, num_kv_heads=Hkv)
    pipe.host_reads = host_reads
    cache = pipe.new_cache(0, 2, Hkv, D)
    assert cache.int4_block == pipe.backend("cpu").int4_block(torch.device("cpu"))  # the layout asked for
    cache.append(torch.randn(2, Hkv, 999, D), torch.randn(2, Hkv, 999, D))
    q = torch.randn(2, Hq, D) * 2
    for _ in range(3):  # warm up: derived structures built, storage grown
        cache.append(torch.randn(2, Hkv, 1, D), torch.randn(2, Hkv, 1, D))
        pipe.decode(0, q, cache, D ** -0.5, pipe.plan(cache))
    k, v = torch.randn(2, Hkv, 1, D), torch.randn(2, Hkv, 1, D)
    with count_ops() as c:
        cache.append(k, v)
        pipe.decode(0, q, cache, D ** -0.5, pipe.plan(cache))
    assert pipe.stats.as_dict()["per_layer"][0]["dense"] is False
    return c


@pytest.mark.parametrize("int4_block", [None, 32, 64], ids=["native-block", "avx2-block", "avx512-block"])
@pytest.mark.parametrize("backend,host_reads,bound", [
    pytest.param("triton", False, "triton", marks=BACKENDS[1].marks),
    ("torch", False, "torch-fixed"),
    ("torch", True, "torch-cpu")])
def test_ops_per_sparse_layer_step(backend, host_reads, bound, int4_block, monkeypatch):
    """The bounds hold whichever int4 layout the CPU's GEMV reads (32-token blocks on AVX2, 64 on AVX-512): forced
    here, so an AVX2 machine checks the AVX-512 machines' layout too (and the other way round)."""
    if int4_block is not None:
        if backend != "torch":
            pytest.skip("only the torch backend's CPU layout depends on the CPU")
        monkeypatch.setattr(TorchBackend, "int4_block", lambda self, device: int4_block)
    c = _layer_step(backend, host_reads)
    assert c.ops + c.launches <= OPS_BOUND[bound], c.summary()
    if not host_reads:
        assert c.syncs == 0, c.summary()
    if backend == "triton":
        assert c.launches >= 5, c.summary()  # select, estimate, prune and attend ran as kernels


@pytest.mark.real_crossover
def test_dense_below_the_crossover_sparse_above():
    from twilight.config import DENSE_BELOW_AUTO, ConfigError, TwilightConfig

    assert TwilightConfig.load("quest-twilight").dense_below == "auto"
    assert TwilightConfig.load("quest-twilight").crossover("cpu") == DENSE_BELOW_AUTO["cpu"]
    with pytest.raises(ConfigError, match="dense_below"):
        TwilightConfig.load({"dense_below": -1})
    with pytest.raises(ConfigError, match="dense_below"):
        TwilightConfig.load({"dense_below": "soon"})

    Hq, Hkv, D = 8, 2, 64
    pipe = TwilightPipeline(sparse("torch", dense_below=400), num_layers=1, num_q_heads=Hq, num_kv_heads=Hkv)
    cache = pipe.new_cache(0, 1, Hkv, D)
    k, v = torch.randn(1, Hkv, 420, D), torch.randn(1, Hkv, 420, D)
    cache.append(k[:, :, :399], v[:, :, :399])
    q = torch.randn(1, Hq, D) * 3
    assert cache.derived_length == 0  # nothing derived while below the crossover
    out = pipe.decode(0, q, cache, D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q.view(1, Hkv, 4, D), k[:, :, :399], v[:, :, :399],
                                                           scale=D ** -0.5).view(1, Hq, D)
    assert torch.allclose(out, ref, atol=1e-5)  # exactly dense attention
    assert pipe.stats.as_dict()["per_layer"][0]["dense"] is True
    assert cache.derived_length == 0
    cache.append(k[:, :, 399:400], v[:, :, 399:400])  # 400 tokens: the crossover
    pipe.stats.reset()
    pipe.decode(0, q, cache, D ** -0.5)
    assert cache.derived_length == 400  # built for the whole context at the first sparse step
    stats = pipe.stats.as_dict()
    assert stats["per_layer"][0]["dense"] is False and stats["mean_attended_tokens"] < 200


def _agreement_run(backend, lengths, bounds_dtype=None, pruned=False, seed=7, monkeypatch=None):
    """The issue's repros: tiny Llama (8 q / 2 kv heads, dim 32, 2 layers), Quest with a budget of 64, exact estimator
    and no pruner, or int4 + top-p 0.9; ``bounds_dtype`` forces the page bounds' dtype (None: the cache's, exact)."""
    model = tiny_llama(layers=2, heads=8, kv_heads=2, dim=32, seed=seed)
    cfg = {"selector": {"type": "quest", "token_budget": 64, "page_size": 16},
           "estimator": {"type": "int4" if pruned else "exact"},
           "pruner": {"type": "top_p", "p": 0.9} if pruned else {"type": "none"},
           "dense_layers": [], "dense_below": 0, "backend": backend}
    twilight.patch(model, cfg)
    hf.make_cache(model).pipeline.bounds_dtype = bounds_dtype  # the model's pipeline: every cache made from now on
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    L = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(L - len(s), dtype=torch.long), s]) for s in seqs])
    mask = torch.stack([torch.cat([torch.zeros(L - len(s), dtype=torch.long), torch.ones(len(s), dtype=torch.long)])
                        for s in seqs])
    picked = []  # Quest's candidates of every sparse layer step, as [B, Hkv, length] masks
    select = TwilightPipeline.select

    def recording_select(self, layer_idx, q, cache, plan=None):
        sel = select(self, layer_idx, q, cache, plan)
        picked.append(sel.to_mask(cache.length))
        return sel

    monkeypatch.setattr(TwilightPipeline, "select", recording_select)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    monkeypatch.undo()
    stats = twilight.budget_stats(model).as_dict()
    layer = hf.output_cache(out).layer_cache(0)
    assert layer.page_bounds.dtype == (bounds_dtype or torch.float32)  # what was asked for, whatever the CPU
    return out.logits[-1], stats, picked


@pytest.mark.skipif(not INTERPRET or twilight.available_backends("cpu")["triton"] is not None,
                    reason="the triton backend on the CPU needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("bounds_dtype", [None, torch.bfloat16], ids=["exact-bounds", "bf16-bounds"])
@pytest.mark.parametrize("lengths,pruned", [([500], False), ([192, 192], False), ([501, 333], False),
                                            ([190, 190], True)])
def test_triton_and_torch_agree_through_the_patch(lengths, pruned, bounds_dtype, monkeypatch):
    """Both page-bound dtypes (the AVX-512 machines once got bf16 bounds, AVX2 ones float32, by the CPU's
    capability): forced here, so that each is checked on any CPU. The two backends pick the same pages."""
    ref_logits, ref_stats, ref_picked = _agreement_run("torch", lengths, bounds_dtype, pruned, monkeypatch=monkeypatch)
    tri_logits, tri_stats, tri_picked = _agreement_run("triton", lengths, bounds_dtype, pruned,
                                                       monkeypatch=monkeypatch)
    # the same pages in every layer and step (Quest's best pages with the most recent page always in)
    assert len(ref_picked) == len(tri_picked) == 2 * 2  # 2 layers, 2 decode steps (the first token is prefill's)
    for step, (r, t) in enumerate(zip(ref_picked, tri_picked, strict=True)):
        assert torch.equal(r, t), f"layer step {step}: the backends picked different pages"
    if not pruned:  # hence the same tokens per head and the same logits
        assert tri_stats["per_head"] == ref_stats["per_head"]
        assert torch.allclose(tri_logits, ref_logits, atol=1e-3), float((tri_logits - ref_logits).abs().max())
    else:  # top-p over int4 estimates: the torch backend's CPU GEMV rounds q to bf16, triton's sums in float32
        assert torch.allclose(tri_logits, ref_logits, atol=2e-2), float((tri_logits - ref_logits).abs().max())
