"""End-to-end decode latency: ``model.generate()`` patched vs unpatched, and the cache's memory overhead.

For each model and context length the prompt is prefilled **once** (unpatched, chunked) and its K/V copied
into a fresh cache of every variant, so every variant decodes from the same state without paying its own
prefill; ``generate()`` then receives the prompt and the prefilled cache and produces ``--new-tokens``
tokens greedily. Variants:

- ``hf-dynamic``: unpatched, transformers' default ``DynamicCache`` (grows by ``torch.cat`` every step).
- ``hf-static``: unpatched, a preallocated ``StaticCache`` (the strongest unpatched baseline on CPU).
- ``dense``: patched with the ``dense`` preset: our ``LayerCache`` with dense attention. The ratio to the
  unpatched runs is the gain (or loss) from cache handling alone, with no sparsity.
- ``quest``, ``quest-twilight``, ``twilight``: patched with those presets, as ``twilight.patch`` runs them:
  below the dense crossover (``dense_below="auto"``: ``twilight.config.DENSE_BELOW_AUTO`` for the device) every
  layer decodes densely. The ratio to ``dense`` is the gain from sparsity.
- ``quest-twilight-sparse``: quest-twilight with ``dense_below=0``, sparse at every context: what the sparse step
  costs where the crossover would not use it (the crossover is where it starts to beat ``dense``).
- ``<variant>-compiled`` (not run by default; ``--variants`` or ``--compiled``): the same through ``generate()``'s
  own compilation of the decode step (``compile_config=CompileConfig()``: inductor, ``dynamic=None``; on a CPU
  with transformers' switch to compile on every device): ``hf-static-compiled`` is what a transformers user
  already has; ``dense-compiled``, ``quest-compiled``, ``quest-twilight-compiled`` and
  ``quest-twilight-sparse-compiled`` compile where the cache says it can (``TwilightCache.is_compileable``:
  the ``torch`` and ``cpu`` backends on a CPU); elsewhere they run eagerly and say so (``compile.graphs`` 0).
  Each compiled run first generates a few tokens untimed (``compile.warmup_s``), so the timed tokens reuse the
  compiled graphs; ``compile.graphs`` and ``compile.graph_breaks`` are dynamo's counters over the run.

The per-token latency is the median (and IQR) of the intervals between consecutive tokens reported by a
streamer, excluding the first new token, pooled over ``--rounds`` runs of every variant in alternating
order (so that a change in background load affects all variants alike). Memory: bytes of each cache
after generation; for the patched runs ``LayerCache.memory_bytes()`` summed over layers, whose
``overhead_ratio`` (int4 keys, their scales and Quest's page bounds over the exact K/V) is what Twilight
adds.

Models: ``smollm2`` (the embedded SmolLM2-135M-Instruct, real text: a passkey prompt) and
``llama3-8b-random``, a randomly initialised model with Llama-3-8B's attention and MLP shapes (hidden
4096, 32/8 heads of 128, MLP 14336) and only ``--llama-layers`` layers (all of them sparse) and a
smaller vocabulary; its attention is nearly flat, so its budgets are large (reported).

Run ``python scripts/bench_e2e.py --help`` or ``twilight bench e2e --help``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

from twilight_bench import common
from twilight_bench.common import DTYPES, Timing, fmt_ms, markdown_table, size_label

MODELS = ("smollm2", "llama3-8b-random")
UNPATCHED = ("hf-dynamic", "hf-static")
PATCHED = ("dense", "quest", "quest-twilight", "quest-twilight-sparse", "twilight")
SPARSE_SUFFIX = "-sparse"  # the preset with dense_below=0: sparse from the first step, whatever the crossover
COMPILED_SUFFIX = "-compiled"  # generate() compiles the decode step (CompileConfig)
UNPATCHED_COMPILED = ("hf-static-compiled",)
PATCHED_COMPILED = ("dense-compiled", "quest-compiled", "quest-twilight-compiled", "quest-twilight-sparse-compiled")
ALL_UNPATCHED = UNPATCHED + UNPATCHED_COMPILED
ALL_PATCHED = PATCHED + PATCHED_COMPILED
WARMUP_TOKENS = 4  # untimed tokens a compiled run generates first: its graphs are compiled by then
DEFAULT_CONTEXTS = {"smollm2": "1k,4k", "llama3-8b-random": "4k,16k"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the end-to-end benchmark's options to ``parser`` (for ``twilight bench e2e``)."""
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--contexts", default=None,
                        help="prompt lengths for every model, e.g. 1k,4k (default: smollm2 1k,4k; "
                             "llama3-8b-random 4k,16k)")
    parser.add_argument("--variants", default=",".join(UNPATCHED + PATCHED),
                        help=f"comma-separated, of {', '.join(ALL_UNPATCHED + ALL_PATCHED)}")
    parser.add_argument("--compiled", action="store_true",
                        help=f"also run the compiled variants ({', '.join(UNPATCHED_COMPILED + PATCHED_COMPILED)})")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (>= 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every variant (alternating order); per-token samples are pooled")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--token-budget", type=int, default=8192, help="Quest's candidate budget")
    parser.add_argument("--p", type=float, default=0.85)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--llama-vocab", type=int, default=32000)
    parser.add_argument("--llama-intermediate", type=int, default=14336)
    parser.add_argument("--llama-hidden", type=int, default=4096,
                        help="hidden size (heads stay 32/8; head_dim = hidden / 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    return parser


# ---------------------------------------------------------------------- models
def random_llama(layers: int = 2, vocab: int = 32000, intermediate: int = 14336, hidden: int = 4096,
                 dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` with Llama-3-8B's head shapes (32 query / 8 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=hidden // 32, max_position_embeddings=131072, rope_theta=500000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.pad_token_id = 0
    return model.eval()


def load_model(name: str, args, dtype: torch.dtype, device: torch.device):
    """``(model, tokenizer or None, spec overrides)`` for a benchmark model name."""
    if name == "smollm2":
        import twilight

        model, tok = twilight.load_default_model(dtype=dtype, device=device)
        return model, tok, {}
    if name == "llama3-8b-random":
        model = random_llama(args.llama_layers, args.llama_vocab, args.llama_intermediate, args.llama_hidden,
                             dtype, device)
        return model, None, {"dense_layers": []}  # a two-layer model: every layer sparse
    raise SystemExit(f"--models: unknown model {name!r} (use {', '.join(MODELS)})")


def make_prompt(name: str, tokenizer, length: int, batch: int, vocab: int, device) -> torch.Tensor:
    """``[batch, ~length]`` prompt ids: a passkey prompt for a real tokenizer, seeded random ids otherwise."""
    if tokenizer is not None:
        from twilight.models import passkey_prompt

        ids = tokenizer(passkey_prompt(tokenizer, length), return_tensors="pt").input_ids
        return ids.expand(batch, -1).to(device)
    gen = torch.Generator().manual_seed(length)
    return torch.randint(3, vocab, (batch, length), generator=gen).to(device)


def base_variant(variant: str) -> str:
    """``variant`` without its ``-compiled`` suffix."""
    return variant[:-len(COMPILED_SUFFIX)] if variant.endswith(COMPILED_SUFFIX) else variant


def spec_for(variant: str, args, overrides: dict) -> dict:
    from twilight.config import TwilightConfig

    variant = base_variant(variant)
    always_sparse = variant.endswith(SPARSE_SUFFIX)
    cfg = TwilightConfig.load(variant[:-len(SPARSE_SUFFIX)] if always_sparse else variant).to_dict()
    cfg["backend"] = args.backend
    if always_sparse:
        cfg["dense_below"] = 0
    if cfg["selector"]["type"] == "quest":
        cfg["selector"]["token_budget"] = args.token_budget
    if cfg["pruner"]["type"] == "top_p":
        cfg["pruner"]["p"] = args.p
    cfg.update(overrides)
    cfg.pop("name", None)
    return cfg


# ---------------------------------------------------------------------- timing
class TokenTimer:
    """A ``generate()`` streamer that timestamps every ``put`` (the prompt, then each new token)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        common.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def intervals_ms(self) -> list[float]:
        """Per-token times after the first new token (the first interval includes generate()'s setup)."""
        s = self.stamps
        return [(b - a) * 1e3 for a, b in zip(s[1:], s[2:], strict=False)]


def prefill(model, ids: torch.Tensor, chunk: int):
    """Unpatched forward over ``ids`` in chunks; returns the ``DynamicCache``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for c0 in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, c0:c0 + chunk], past_key_values=cache, use_cache=True)
    return cache


def _kv_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def fresh_cache(variant: str, model, kv, max_len: int):
    """A new cache for ``variant`` holding a copy of the prefilled ``kv``."""
    from transformers import DynamicCache, StaticCache

    variant = base_variant(variant)
    if variant == "hf-dynamic":
        cache = DynamicCache(config=model.config)
    elif variant == "hf-static":
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    else:
        from twilight.integrations.hf import make_cache

        cache = make_cache(model, max_cache_len=max_len)  # allocated once, as generate() does for itself
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    return cache


def cache_memory(variant: str, cache, plain_bytes: int) -> dict:
    """Bytes the cache holds after generation, against plain K/V of the same tokens."""
    if variant in ALL_PATCHED:
        parts = [cache.layer_cache(i).memory_bytes() for i in range(len(cache.layers))
                 if cache.layer_cache(i) is not None]
        kv = sum(p["kv"] for p in parts)
        extra = sum(p["extra"] for p in parts)
        return {"plain_kv_bytes": plain_bytes, "kv_bytes": kv, "extra_bytes": extra, "total_bytes": kv + extra,
                "overhead_ratio": extra / kv if kv else 0.0, "total_over_plain": (kv + extra) / plain_bytes}
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
    return {"plain_kv_bytes": plain_bytes, "kv_bytes": total, "extra_bytes": 0, "total_bytes": total,
            "overhead_ratio": 0.0, "total_over_plain": total / plain_bytes}


def run_variant(variant: str, model, ids: torch.Tensor, kv, args, overrides: dict, device) -> dict:
    """One ``generate()`` run of ``variant`` from the prefilled ``kv``; returns its record."""
    import twilight

    n = args.new_tokens
    patched = variant in ALL_PATCHED
    compiled = variant.endswith(COMPILED_SUFFIX)
    if patched:
        twilight.patch(model, spec_for(variant, args, overrides))
    try:
        extra = {}

        def generate(new_tokens: int, cache, **kwargs):  # greedy, from ``cache`` (a copy of the prefilled one)
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=model.generation_config.pad_token_id, **extra, **kwargs)

        if compiled:
            extra["compile_config"] = compile_config(device)
            # from scratch: graphs of earlier runs (other patches, other models) would count against dynamo's
            # recompile limit, past which it silently runs the step eagerly
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            t0 = time.perf_counter()  # the first tokens compile the step (and recompile it once the length moves)
            generate(WARMUP_TOKENS, fresh_cache(variant, model, kv, ids.shape[1] + n + 1))
            warmup_s = time.perf_counter() - t0
        cache = fresh_cache(variant, model, kv, ids.shape[1] + n + 1)
        if patched:
            twilight.budget_stats(model).reset()
        timer = TokenTimer(device)
        common.synchronize(device)
        t0 = time.perf_counter()
        out = generate(n, cache, streamer=timer, return_dict_in_generate=True)
        common.synchronize(device)
        total = time.perf_counter() - t0
        iv = timer.intervals_ms()
        rec = {"variant": variant, "per_token": Timing.from_samples(iv).to_dict(), "intervals_ms": iv,
               "total_s": total,
               "new_tokens": out.sequences.shape[1] - ids.shape[1],
               "tokens": out.sequences[0, ids.shape[1]:].tolist()}
        if compiled:
            counters = torch._dynamo.utils.counters
            rec["compile"] = {"graphs": counters["stats"]["unique_graphs"],
                              "graph_breaks": sum(counters["graph_break"].values()), "warmup_s": warmup_s}
        B, L = ids.shape
        cfg = model.config
        hkv = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elt = torch.empty(0, dtype=model.dtype).element_size()
        plain = 2 * B * hkv * (L + n - 1) * d * elt * cfg.num_hidden_layers
        rec["memory"] = cache_memory(variant, out.past_key_values, plain)
        if patched:
            st = twilight.budget_stats(model).as_dict()
            rec["budget"] = {k: st[k] for k in ("mean_attended_tokens", "min_attended_tokens", "max_attended_tokens",
                                                "mean_kv_tokens_read", "mean_context_tokens", "attended_fraction")}
        return rec
    finally:
        if patched:
            twilight.unpatch(model)


def compile_config(device: torch.device):
    """What a compiled variant passes to ``generate()``: transformers' defaults (inductor, ``dynamic=None``), on a
    CPU with its switch to compile on every device (``generate()`` compiles on CUDA only unless told so)."""
    from transformers import CompileConfig

    config = CompileConfig()
    if device.type == "cpu":
        config._compile_all_devices = True  # transformers' own switch (a private attribute, no public setter)
    return config


def bench_model(name: str, args, dtype, device, say) -> list[dict]:
    model, tok, overrides = load_model(name, args, dtype, device)
    contexts = common.parse_sizes(args.contexts or DEFAULT_CONTEXTS[name])
    variants = common.parse_list(args.variants)
    if args.compiled:
        variants += [v for v in UNPATCHED_COMPILED + PATCHED_COMPILED if v not in variants]
    unknown = [v for v in variants if v not in ALL_UNPATCHED + ALL_PATCHED]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(ALL_UNPATCHED + ALL_PATCHED)}")
    rows = []
    cfg = model.config
    for length in contexts:
        ids = make_prompt(name, tok, length, args.batch, cfg.vocab_size, device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            kv = _kv_of(prefill(model, ids[:, :-1], args.prefill_chunk))
        kv = [(k.clone(), v.clone()) for k, v in kv]
        row = {"model": name, "context": ids.shape[1], "batch": args.batch, "dtype": common.DTYPE_NAMES[dtype],
               "layers": cfg.num_hidden_layers, "heads": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}/"
               f"{getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads}",
               "params": sum(p.numel() for p in model.parameters()),
               "prefill_s": time.perf_counter() - t0, "runs": {}}
        say(f"{name} context {ids.shape[1]}: prefill {row['prefill_s']:.1f}s")
        for rnd in range(args.rounds):  # rounds alternate the order, so a load change hits every variant alike
            for variant in (variants if rnd % 2 == 0 else variants[::-1]):
                with torch.inference_mode():
                    rec = run_variant(variant, model, ids, kv, args, overrides, device)
                if variant in row["runs"]:
                    prev = row["runs"][variant]
                    rec["intervals_ms"] = prev["intervals_ms"] + rec["intervals_ms"]
                    rec["round_medians_ms"] = prev["round_medians_ms"] + [rec["per_token"]["median_ms"]]
                    rec["per_token"] = Timing.from_samples(rec["intervals_ms"]).to_dict()
                else:
                    rec["round_medians_ms"] = [rec["per_token"]["median_ms"]]
                row["runs"][variant] = rec
        for variant in variants:
            rec = row["runs"][variant]
            b = rec.get("budget")
            say(f"  {variant:>15}: {rec['per_token']['median_ms']:8.2f} ms/token (IQR {rec['per_token']['iqr_ms']:.2f})"
                f"  memory x{rec['memory']['total_over_plain']:.2f} of plain K/V"
                + (f"  budget {b['mean_attended_tokens']:.0f}/head ({b['min_attended_tokens']:.0f}-"
                   f"{b['max_attended_tokens']:.0f}) of {b['mean_context_tokens']:.0f}" if b else ""))
        _derive(row)
        rows.append(row)
        del kv
        gc.collect()
    del model
    gc.collect()
    return rows


def _derive(row: dict) -> None:
    """Speed-ups: cache handling (dense vs unpatched) and sparsity (sparse presets vs dense)."""
    runs = row["runs"]
    ms = {v: r["per_token"]["median_ms"] for v, r in runs.items()}
    unpatched = [v for v in ALL_UNPATCHED if v in ms]
    best = min(unpatched, key=ms.get) if unpatched else None
    row["best_unpatched"] = best
    s = {}
    for v in ALL_PATCHED:
        if v not in ms:
            continue
        s[v] = {}
        if best:
            s[v]["vs_best_unpatched"] = ms[best] / ms[v]
        for u in unpatched:
            s[v][f"vs_{u}"] = ms[u] / ms[v]
        if "dense" in ms:
            s[v]["vs_dense_preset"] = ms["dense"] / ms[v]
    row["speedup"] = s
    ref = runs.get(best) if best else None
    if ref:
        for r in runs.values():
            same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"], strict=False))
            r["tokens_match_best_unpatched"] = same / max(1, len(ref["tokens"]))


# ---------------------------------------------------------------------- report
def _attended(budget: dict) -> str:
    """``"60 (1–1246)"``: mean (min–max) tokens attended per head."""
    return (f"{budget['mean_attended_tokens']:.0f} "
            f"({budget['min_attended_tokens']:.0f}–{budget['max_attended_tokens']:.0f})")


def markdown_report(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    variants = [v for v in (*ALL_UNPATCHED, *ALL_PATCHED) if any(v in r["runs"] for r in rows)]
    lines = ["# End-to-end decode latency: model.generate(), patched vs unpatched", "",
             common.environment_markdown(env), "",
             f"{result['args']['new_tokens']} new tokens, greedy, batch {result['args']['batch']}; every variant "
             "decodes from the same prefilled prompt. ms per generated token: median ± half the IQR over the "
             "tokens after the first. *cache gain* = best unpatched / dense preset (our cache, no sparsity); "
             "*sparsity gain* = dense preset / quest-twilight; *total* = best unpatched / quest-twilight. "
             f"quest-twilight decodes densely below its crossover (dense_below=\"auto\": "
             f"{result.get('dense_below_auto', '?')} tokens on this device); quest-twilight-sparse never does.", ""]
    head = ["model", "ctx", *variants, "cache gain", "sparsity gain", "total (QT)", "QT budget", "QT memory"]
    body = []
    for r in rows:
        runs, sp = r["runs"], r["speedup"]
        cells = [r["model"], size_label(r["context"]) if r["context"] % 1024 == 0 else r["context"]]
        cells += [fmt_ms(runs[v]["per_token"]) if v in runs else "—" for v in variants]
        best = r.get("best_unpatched")
        cells.append(f"{runs[best]['per_token']['median_ms'] / runs['dense']['per_token']['median_ms']:.2f}x"
                     if best and "dense" in runs else "—")
        cells.append(f"{sp['quest-twilight']['vs_dense_preset']:.2f}x"
                     if "quest-twilight" in sp and "vs_dense_preset" in sp["quest-twilight"] else "—")
        cells.append(f"**{sp['quest-twilight']['vs_best_unpatched']:.2f}x** vs {best}"
                     if "quest-twilight" in sp and best else "—")
        qt = runs.get("quest-twilight")
        if qt:
            b, m = qt["budget"], qt["memory"]
            cells.append(f"{_attended(b)} of {b['mean_context_tokens']:.0f}")
            cells.append(f"+{100 * m['overhead_ratio']:.1f}% over K/V")
        else:
            cells += ["—", "—"]
        body.append(cells)
    lines += [markdown_table(head, body), ""]
    body = []
    for r in rows:
        for v, run in r["runs"].items():
            if "compile" in run:
                c, best = run["compile"], r.get("best_unpatched")
                vs = r["speedup"].get(v, {}).get("vs_best_unpatched")
                body.append([r["model"], r["context"], v, c["graphs"], c["graph_breaks"], f"{c['warmup_s']:.1f}",
                             fmt_ms(run["per_token"]), f"**{vs:.2f}x** vs {best}" if vs else "—"])
    if body:
        lines += ["## Compiled variants", "",
                  "generate() compiled the decode step itself (CompileConfig(): inductor, dynamic=None). *graphs*, "
                  "*breaks*: dynamo's counters over the run (0 graphs: the cache was not compileable there and the "
                  "step ran eagerly); *warm-up*: seconds of the untimed first tokens, which compile.", "",
                  markdown_table(["model", "ctx", "variant", "graphs", "breaks", "warm-up s", "ms/token",
                                  "vs best unpatched"], body), ""]
    body = []
    for r in rows:
        for v, run in r["runs"].items():
            m = run["memory"]
            b = run.get("budget")
            body.append([r["model"], r["context"], v, f"{m['total_bytes'] / 2**20:.1f}",
                         f"{m['plain_kv_bytes'] / 2**20:.1f}", f"{100 * m['overhead_ratio']:.1f}%",
                         f"{m['total_over_plain']:.2f}", _attended(b) if b else "all",
                         f"{100 * run.get('tokens_match_best_unpatched', 0):.0f}%"])
    lines += ["## Memory and budgets", "",
              "*MiB held*: the cache after generation (patched: at its capacity, allocated once at the final length); "
              "*plain K/V*: exact K/V of the same tokens; *extra*: int4 keys, scales and page bounds over the "
              "exact K/V; *tokens match*: share of generated tokens equal to the best unpatched run's.", "",
              markdown_table(["model", "ctx", "variant", "MiB held", "plain K/V MiB", "extra", "held/plain",
                              "attended per head", "tokens match"], body), ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str | None:
    plt = common.pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    if not rows:
        return None
    variants = [v for v in (*ALL_UNPATCHED, *ALL_PATCHED) if any(v in r["runs"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4))
    width = 0.8 / len(variants)
    colors = {"hf-dynamic": "grey", "hf-static": "black", "dense": "tab:purple", "quest": "tab:blue",
              "quest-twilight": "tab:red", "quest-twilight-sparse": "salmon", "twilight": "tab:green"}
    for i, v in enumerate(variants):
        xs, ys, errs = [], [], []
        for j, r in enumerate(rows):
            if v in r["runs"]:
                t = r["runs"][v]["per_token"]
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(t["median_ms"])
                errs.append(t["iqr_ms"] / 2)
        ax.bar(xs, ys, width, yerr=errs, label=v, color=colors.get(v), capsize=2)
    ax.set_xticks(range(len(rows)), [f"{r['model']}\n{size_label(r['context'])}" for r in rows])
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"generate() decode latency, {result['env']['device_name']} ({result['env']['date'][:10]})",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- entry points
def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (from ``add_arguments``); writes and returns the results."""
    if args.new_tokens < 3:
        raise SystemExit("--new-tokens must be >= 3 (the first new token is not timed)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    env = common.environment(device)
    out = args.out or common.default_out_dir(env)
    os.makedirs(out, exist_ok=True)
    say(f"device: {env['device_name']}; writing to {out}")
    rows = []
    for name in common.parse_list(args.models):
        rows += bench_model(name, args, dtype, device, say)
    from twilight.config import TwilightConfig

    result = {"benchmark": "e2e", "env": env, "args": dict(vars(args), device=str(device)), "rows": rows,
              "dense_below_auto": TwilightConfig.load("quest-twilight").crossover(device)}
    common.write_json(os.path.join(out, "e2e.json"), result)
    with open(os.path.join(out, "e2e.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(result))
    if not args.no_plot:
        plot(result, os.path.join(out, "e2e.png"))
    say(f"wrote {out}/e2e.json, e2e.md" + ("" if args.no_plot else ", e2e.png"))
    result["out"] = out
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
