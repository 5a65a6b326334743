"""One decode step on a GPU: no host synchronisation, and capturable in a CUDA graph.

Every test here is marked ``gpu`` (skipped without CUDA; tests/conftest.py) and runs from
``bash scripts/gpu_check.sh`` on a GPU machine.

- A patched tiny random Llama (4 layers, 8 query / 2 kv heads of dim 64, bf16) decodes with a manual forward
  loop; after warm-up steps, one decode step runs under ``torch.cuda.set_sync_debug_mode("error")`` (any
  synchronising CUDA call raises) and, first, under ``twilight.diagnostics.count_ops`` (which says where a sync
  is, should there be one). Configs: quest-twilight with the ``triton`` and the ``torch`` backends, no dense
  layers, a Quest budget of 64 tokens, so that every layer's selection is sparse.
- ``TwilightPipeline.decode`` of every layer of one step, with one ``pipe.plan(cache)`` for the step, is
  captured in a ``torch.cuda.CUDAGraph`` and replayed; the outputs equal eager calls on the same inputs.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import twilight
from twilight.diagnostics import count_ops

pytestmark = pytest.mark.gpu

TOKEN_BUDGET = 64
PAGE_SIZE = 16
LAYERS, HQ, HKV, D = 4, 8, 2, 64
PROMPT = 320
WARMUP_STEPS = 3


def sparse_config(backend: str) -> dict:
    """quest-twilight, sparse in every layer and at every context: no dense layers, a 64-token Quest budget."""
    cfg = {**twilight.PRESETS["quest-twilight"], "backend": backend, "dense_layers": []}
    cfg["selector"] = {**cfg["selector"], "token_budget": TOKEN_BUDGET, "page_size": PAGE_SIZE}
    cfg["dense_below"] = 0  # no dense crossover, whatever the device's default
    return cfg


def _backend_or_skip(backend: str) -> None:
    why = twilight.available_backends("cuda")[backend]
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=HQ * D, intermediate_size=1024, num_hidden_layers=LAYERS,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)


def _cache_keyword(model) -> str:
    """transformers up to 5.23 takes the cache as ``past_key_values``, from 5.24 as ``cache``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_patched_llama_decode_step_does_not_synchronise(backend):
    from twilight.integrations import hf

    _backend_or_skip(backend)
    model = tiny_llama()
    twilight.patch(model, sparse_config(backend))
    try:
        cache = hf.make_cache(model)
        kw = {_cache_keyword(model): cache, "use_cache": True}
        ids = torch.randint(3, 1000, (2, PROMPT), device="cuda")  # two sequences, no padding: no attention mask

        def step(tokens):
            logits = model(input_ids=tokens, **kw).logits
            return logits, logits[:, -1:].argmax(-1)  # stays on the device: no host read

        with torch.inference_mode():
            logits, nxt = step(ids)  # prefill (the model's own attention)
            for _ in range(WARMUP_STEPS):  # decode steps: kernels compiled, cache grown, derived structures built
                logits, nxt = step(nxt)
            torch.cuda.synchronize()

            # 1. Counted: a sync fails here with the op and the place that issued it.
            before = hf.engagement(model)
            with count_ops(cpu_syncs=False) as c:
                logits, nxt = step(nxt)
            torch.cuda.synchronize()
            assert c.syncs == 0, c.summary()
            if backend == "triton":
                assert c.launches >= LAYERS, c.summary()  # Twilight's kernels ran in every layer
            else:
                assert c.launches == 0, c.summary()

            # 2. CUDA's own check: any synchronising call in the step raises.
            torch.cuda.set_sync_debug_mode("error")
            try:
                logits, nxt = step(nxt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        after = hf.engagement(model)
        # both checked steps were decode steps that went through Twilight
        assert after["decode_forwards"] - before["decode_forwards"] == 2
        assert after["twilight_forwards"] - before["twilight_forwards"] == 2
        assert torch.isfinite(logits.float()).all()
        assert cache.layer_cache(0).length == PROMPT + WARMUP_STEPS + 2
        # and they were sparse: Quest's 64 candidates of ~330 tokens, pruned further by top-p
        stats = twilight.budget_stats(model).as_dict()
        assert 0 < stats["mean_attended_tokens"] <= TOKEN_BUDGET + PAGE_SIZE  # budget rounded to pages
    finally:
        twilight.unpatch(model)


def test_decode_step_is_captured_in_a_cuda_graph():
    from twilight.pipeline import TwilightPipeline

    _backend_or_skip("triton")
    B, T, dtype = 2, 1000, torch.float16
    scale = D ** -0.5
    pipe = TwilightPipeline(sparse_config("triton"), num_layers=LAYERS, num_q_heads=HQ, num_kv_heads=HKV)
    caches = []
    for layer in range(LAYERS):
        cache = pipe.new_cache(layer, B, HKV, D, dtype=dtype, device="cuda")
        cache.append(torch.randn(B, HKV, T, D, device="cuda", dtype=dtype),
                     torch.randn(B, HKV, T, D, device="cuda", dtype=dtype))
        caches.append(cache)
    plan = pipe.plan(caches[0])  # one plan for the whole step: every layer holds the same positions
    # static input buffers: the graph reads them at replay
    qs = [torch.randn(B, HQ, D, device="cuda", dtype=dtype) for _ in range(LAYERS)]

    def step():
        return [pipe.decode(layer, qs[layer], caches[layer], scale, plan=plan) for layer in range(LAYERS)]

    with torch.inference_mode():
        # the step is sparse: Quest's candidates are a budget's worth of pages, not the whole context
        sel = pipe.select(LAYERS - 1, qs[-1], caches[-1], plan)
        assert not sel.is_full_range
        assert int(sel.counts.max()) <= TOKEN_BUDGET + PAGE_SIZE  # budget rounded to whole pages

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream, as CUDA-graph capture requires
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()

        first = None
        for trial in range(2):  # new queries each time: the replay reads the buffers, nothing was baked in
            for q in qs:
                q.copy_(torch.randn_like(q))
            graph.replay()
            torch.cuda.synchronize()
            eager = step()
            torch.cuda.synchronize()
            for layer in range(LAYERS):
                assert static_out[layer].shape == (B, HQ, D) and static_out[layer].dtype == dtype
                assert torch.isfinite(static_out[layer].float()).all()
                torch.testing.assert_close(static_out[layer], eager[layer], atol=2e-3, rtol=2e-3,
                                           msg=lambda m, i=layer, t=trial: f"layer {i}, replay {t}: {m}")
            if trial == 0:
                first = [o.clone() for o in static_out]
        assert first is not None and not torch.equal(first[0], static_out[0])  # the second replay computed new outputs
