"""The kernel backends through the pipeline, and the backend registry's choices and errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from kernel_helpers import INTERPRET, TRITON_DEVICES, assert_close, assert_top_p_guarantee, attention_reference, tol_for

import twilight.backends as backends
from twilight.config import TwilightConfig
from twilight.pipeline import TwilightPipeline


def _pipeline(preset, backend, **selector):
    cfg = TwilightConfig.load(preset)
    cfg.dense_layers = []
    cfg.backend = backend
    for k, v in selector.items():
        setattr(cfg.selector, k, v)
    return TwilightPipeline(cfg, num_layers=1, num_q_heads=8, num_kv_heads=2)


def _filled(pipe, device, dtype=torch.float16, start=(0, 25), length=330):
    cache = pipe.new_cache(0, batch=2, num_kv_heads=2, head_dim=64, dtype=dtype, device=device,
                           start=torch.tensor(start))
    g = torch.Generator().manual_seed(5)
    cache.append(torch.randn(2, 2, length, 64, generator=g).to(dtype).to(device),
                 torch.randn(2, 2, length, 64, generator=g).to(dtype).to(device))
    return cache


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_twilight_matches_torch_backend(device):
    """Same exact estimates -> same top-p sets and budgets -> same output as the torch backend."""
    outs, stats = {}, {}
    for backend in ("torch", "triton"):
        pipe = _pipeline("twilight", backend)
        pipe.config.estimator.type = "exact"
        dev = device if backend == "triton" else "cpu"
        cache = _filled(pipe, dev)
        q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(9)).half().to(dev)
        outs[backend] = pipe.decode(0, q, cache, 0.125).cpu()
        stats[backend] = pipe.stats
    assert_close(outs["triton"], outs["torch"].double(), 2 * tol_for(torch.float16), "pipeline output")
    assert stats["triton"].summary() == stats["torch"].summary()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_quest_twilight_decode(device):
    """The fused path (quest_select -> int4 -> prune_to_selection -> attend) is self-consistent."""
    pipe = _pipeline("quest-twilight", "triton", token_budget=96)
    backend = pipe.backend(torch.device(device))
    assert backend.name == "triton" and hasattr(backend, "prune_to_selection")
    cache = _filled(pipe, device)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)).half().to(device)
    out = pipe.decode(0, q, cache, 0.125)
    cand = pipe.select(0, q, cache)
    assert int(cand.counts.max()) <= 96 and cand.k_max == 96
    pruned, q_counts = pipe.prune(q, cache, cand, 0.125)
    assert bool((pruned.counts <= cand.counts).all()) and bool((pruned.counts > 0).all())
    # The output is exact attention over the pruned set.
    ref = attention_reference(q, cache, pruned.to_mask(cache.length), 0.125)
    assert_close(out, ref, 2 * tol_for(torch.float16), "decode output")
    # Each query head kept >= p of its estimated mass among the candidates.
    logits = backend.estimate(q, cache, cand, "int4", pipe.plan(cache)) * 0.125
    keep = backend.prune_top_p(logits, pipe.config.pruner.p)
    assert_top_p_guarantee(logits, pipe.config.pruner.p, keep)
    assert torch.equal(keep.sum(-1, dtype=torch.int32).cpu(), q_counts.cpu())


@pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
def test_triton_resolves_on_cpu_under_interpreter():
    assert backends.resolve_backend("triton", "cpu").name == "triton"


def test_unavailable_backends_raise_clearly():
    if not torch.cuda.is_available():
        with pytest.raises(backends.BackendUnavailableError, match="cuda backend needs a CUDA device"):
            backends.resolve_backend("cuda", "cpu")
    with pytest.raises(backends.BackendUnavailableError, match="flashinfer"):
        backends.resolve_backend("flashinfer", "cpu")
    assert backends.resolve_backend("auto", "cpu").name in ("cpu", "torch")


def test_auto_warns_once_and_falls_through(monkeypatch):
    def broken():
        raise RuntimeError("nvcc exploded")

    registry = dict(backends._REGISTRY)
    registry["triton"] = (lambda device: None, broken)
    registry["cuda"] = (lambda device: "not here", registry["cuda"][1])
    registry["flashinfer"] = (lambda device: "not here", registry["flashinfer"][1])
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "_AUTO_SKIP_WARNED", set())
    with pytest.warns(RuntimeWarning, match="skips 'triton'.*nvcc exploded"):
        assert backends.resolve_backend("auto", "cuda").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", "cuda").name == "torch"  # warned once only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(INTERPRET, reason="compiled Triton kernels: run without TRITON_INTERPRET")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_llama_shape_on_gpu(backend):
    """Llama-3-8B head shape (32 q / 8 kv heads, D=128, fp16) at 8k context through the whole pipeline."""
    from twilight.attention import sparse_decode_attention as torch_attention
    from twilight.estimate import estimate_scores
    from twilight.prune import top_p_mask as torch_top_p_mask

    cfg = TwilightConfig.load("quest-twilight")
    cfg.dense_layers, cfg.backend, cfg.selector.token_budget = [], backend, 2048
    pipe = TwilightPipeline(cfg, num_layers=1, num_q_heads=32, num_kv_heads=8)
    cache = pipe.new_cache(0, batch=4, num_kv_heads=8, head_dim=128, dtype=torch.float16, device="cuda",
                           start=torch.tensor([0, 100, 0, 3000]))
    cache.append(torch.randn(4, 8, 8192, 128, device="cuda", dtype=torch.float16),
                 torch.randn(4, 8, 8192, 128, device="cuda", dtype=torch.float16))
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.float16)
    scale = 128 ** -0.5
    be = pipe.backend(q.device)
    cand = pipe.select(0, q, cache)
    est = be.estimate(q, cache, cand, "int4", pipe.plan(cache))
    ref_est = estimate_scores(q, cache, cand, "int4")
    finite = torch.isfinite(ref_est)
    assert torch.equal(finite, torch.isfinite(est))
    assert (est[finite] - ref_est[finite]).abs().max() <= 1e-3 * ref_est[finite].abs().max()
    logits = est * scale
    mask = be.prune_top_p(logits, 0.85)
    assert (mask != torch_top_p_mask(logits, 0.85)).any(-1).float().mean() < 0.01
    pruned, _ = pipe.prune(q, cache, cand, scale)
    out = be.attend(q, cache, pruned, scale, pipe.plan(cache))
    assert_close(out, torch_attention(q, cache, pruned, scale).double(), 4e-3, "attention")
