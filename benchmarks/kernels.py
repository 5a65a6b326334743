"""Kernel microbenchmarks: one layer's decode attention, stage by stage, against dense and Quest.

For every (head shape, dtype, batch, context length) the benchmark fills one ``LayerCache`` with a
realistic attention profile (``twilight_bench.profiles``) and times, interleaved in the same run:

- **dense baselines** on the same, preallocated K/V: ``torch.nn.functional.scaled_dot_product_attention``
  in three formulations (``sdpa-gqa``: ``enable_gqa=True``; ``sdpa-grouped``: ``q.view(B, Hkv, G, D)``;
  ``sdpa-expanded``: K/V repeated to the query heads beforehand) and, on CUDA with FlashInfer installed,
  FlashInfer's dense decode (``flashinfer-dense``, ``flashinfer-dense-tc`` with tensor cores). The fastest
  is *the* dense baseline (``dense_baseline`` in the results says which).
- ``sdpa-dynamic-cat``: the same SDPA after ``torch.cat`` of the whole K/V with one new token, which is
  what transformers' default growing cache does every step. It is not a baseline: the ratio to the dense
  baseline shows how much a speed-up measured against it would owe to cache handling, not sparsity.
- ``dense-preset``: ``TwilightPipeline("dense").decode`` (our own cache and dense path).
- ``quest``, ``quest-twilight``, ``twilight``: ``TwilightPipeline(preset).decode`` with the same selector
  budget (``--token-budget``) and no dense layers.
- per stage of the sparse presets: ``select`` (``pipe.select``), ``estimate`` (``backend.estimate``),
  ``prune`` (``backend.prune_top_p``), ``attend`` (``backend.attend`` on the pruned selection).

Reported per row: median and IQR of every time, speed-ups against the dense baseline and against Quest,
attended tokens per head (mean, min, max; and exact top-p's "oracle" budget for the same queries),
bytes each variant must move and the achieved bandwidth against the device's peak (roofline), and per
preset what one steady-state ``pipe.decode`` call asks of the device (``ops_per_step``, counted by
``twilight.diagnostics.count_ops`` after the timed calls): aten ops, host synchronisations (with where they
happen) and Triton kernel launches.

Run ``python scripts/bench_kernels.py --help`` or ``twilight bench kernels --help``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from twilight.config import TwilightConfig
from twilight.pipeline import TwilightPipeline
from twilight_bench import common
from twilight_bench.common import DTYPE_NAMES, DTYPES, fmt_ms, markdown_table, size_label
from twilight_bench.profiles import ReplayProfile, SyntheticProfile, budget_summary, oracle_top_p_budgets

HEAD_SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
SPARSE_VARIANTS = ("quest", "quest-twilight", "twilight")
DENSE_CANDIDATES = ("sdpa-gqa", "sdpa-grouped", "sdpa-expanded", "flashinfer-dense", "flashinfer-dense-tc")
STAGES = ("select", "estimate", "prune", "attend")
# The speed-up goals of quest-twilight that the report checks; their source and the current standing are in
# benchmarks/README.md ("Where we stand against the goals"). cpu: context -> minimum speed-up over dense SDPA
# (batch 1, Llama-3-8B heads); gpu: one context and batch, minimum speed-ups and fraction of the roofline.
GOALS = {"cpu": {32768: 4.0, 131072: 8.0},
         "gpu": {"context": 32768, "batch": 64, "vs_flashinfer": 3.0, "vs_quest": 1.5, "roofline": 0.6}}


# ---------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the kernel benchmark's options to ``parser`` (for ``twilight bench kernels``)."""
    g = parser.add_argument_group("sizes (defaults depend on the device)")
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    g.add_argument("--contexts", default=None, help="context lengths, e.g. 4k,32k,128k (k = 1024)")
    g.add_argument("--batches", default=None, help="batch sizes (default: 1 on CPU, 1,16,64 on GPU)")
    g.add_argument("--shapes", default="llama3-8b,smollm2",
                   help=f"head shapes: names ({', '.join(HEAD_SHAPES)}) or Hq/Hkv/D like 32/8/128")
    g.add_argument("--dtypes", default=None, help="fp32, fp16, bf16 (default: fp32 on CPU, fp16,bf16 on GPU)")
    s = parser.add_argument_group("sparse attention")
    s.add_argument("--backend", default="auto", help="twilight backend: auto, torch, triton, cuda, flashinfer")
    s.add_argument("--token-budget", type=int, default=8192, help="Quest's candidate budget (quest and quest-twilight)")
    s.add_argument("--page-size", type=int, default=16)
    s.add_argument("--p", type=float, default=0.85, help="top-p mass")
    s.add_argument("--profile", choices=("synthetic", "replay"), default="synthetic",
                   help="attention profile: synthetic (calibrated to SmolLM2's budgets) or replay of SmolLM2's "
                        "captured q/k/v (head shape 9/3/64 only; see twilight_bench.profiles)")
    s.add_argument("--replay-capture", default=None, help="capture file for --profile replay (made if missing)")
    s.add_argument("--replay-layer", type=int, default=15)
    s.add_argument("--growth", type=float, default=0.5,
                   help="synthetic profile: hot sets scale as (context / 4400) ** growth")
    t = parser.add_argument_group("timing")
    t.add_argument("--repeats", type=int, default=15, help="timed rounds at most (interleaved)")
    t.add_argument("--min-repeats", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--max-seconds", type=float, default=30.0, help="stop a group of timings after this long")
    t.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    t.add_argument("--no-dynamic-baseline", action="store_true", help="skip sdpa-dynamic-cat")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    t.add_argument("--bandwidth-mib", type=int, default=512, help="tensor size for measuring the bandwidth peak")
    t.add_argument("--memory-fraction", type=float, default=0.7, help="use at most this share of free memory")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>-<date>)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--quiet", action="store_true")
    return parser


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    args = argparse.Namespace(**vars(args))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.device(args.device).type == "cuda"
    args.contexts = common.parse_sizes(args.contexts or "4k,32k,128k")
    args.batches = common.parse_sizes(args.batches or ("1,16,64" if gpu else "1"))
    args.dtypes = common.parse_list(args.dtypes or ("fp16,bf16" if gpu else "fp32"))
    args.shapes = common.parse_list(args.shapes)
    for name in args.dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {name!r} (use {', '.join(DTYPES)})")
    for name in args.shapes:
        parse_shape(name)
    return args


def parse_shape(name: str) -> tuple[str, int, int, int]:
    """``"llama3-8b"`` or ``"32/8/128"`` -> ``(label, Hq, Hkv, D)``."""
    if name in HEAD_SHAPES:
        return (name, *HEAD_SHAPES[name])
    try:
        hq, hkv, d = (int(x) for x in name.split("/"))
    except ValueError:
        raise SystemExit(f"--shapes: {name!r} is neither {', '.join(HEAD_SHAPES)} nor Hq/Hkv/D") from None
    if hq % hkv:
        raise SystemExit(f"--shapes: {name}: Hq must be a multiple of Hkv")
    return (name, hq, hkv, d)


def variant_config(name: str, args) -> TwilightConfig:
    """A preset with no dense layers, the benchmark's backend, selector budget, page size and p; sparse at every
    context (no dense crossover: the benchmark measures the sparse operator itself)."""
    cfg = TwilightConfig.load(name).replace(dense_layers=[], backend=args.backend)
    if hasattr(cfg, "dense_below"):
        cfg.dense_below = 0
    cfg.selector.page_size = args.page_size
    if cfg.selector.type == "quest":
        cfg.selector.token_budget = args.token_budget
    if cfg.pruner.type == "top_p":
        cfg.pruner.p = args.p
    cfg.name = name
    return cfg.validate()


# ---------------------------------------------------------------------- baselines
def dense_baselines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, expanded_ok: bool,
                    dynamic_ok: bool) -> tuple[dict[str, Callable], dict[str, str]]:
    """Dense decode attention callables on preallocated ``k, v [B, Hkv, L, D]``, and skipped ones with why."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    qg = q.view(B, Hkv, G, D)
    fns: dict[str, Callable] = {
        "sdpa-gqa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True),
        "sdpa-grouped": lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale),
    }
    skipped: dict[str, str] = {}
    if G == 1:
        skipped["sdpa-expanded"] = "no GQA (same as sdpa-gqa)"
    elif expanded_ok:
        k_exp, v_exp = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        fns["sdpa-expanded"] = lambda: F.scaled_dot_product_attention(q4, k_exp, v_exp, scale=scale)
    else:
        skipped["sdpa-expanded"] = "K/V expanded to the query heads would not fit in memory"
    if dynamic_ok:
        k_new, v_new = k[:, :, -1:].clone(), v[:, :, -1:].clone()

        def dynamic_cat():  # transformers' DynamicCache: a whole new K/V every step
            kk, vv = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
            return F.scaled_dot_product_attention(qg, kk, vv, scale=scale)

        fns["sdpa-dynamic-cat"] = dynamic_cat
    if q.device.type == "cuda":
        fi, why = _flashinfer_dense(q, k, v, scale)
        fns.update(fi)
        if why:
            skipped["flashinfer-dense"] = why
    return fns, skipped


def _flashinfer_dense(q, k, v, scale) -> tuple[dict[str, Callable], str | None]:
    """FlashInfer dense decode on the cache as is: each sequence's ``[Hkv, L, D]`` is one page (HND)."""
    try:
        import flashinfer
    except ImportError:
        return {}, "flashinfer is not installed"
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    fns: dict[str, Callable] = {}
    errors = []
    for name, tc in (("flashinfer-dense", False), ("flashinfer-dense-tc", True)):
        try:
            if B == 1:
                def fn(tc=tc):
                    return flashinfer.single_decode_with_kv_cache(q[0], k[0], v[0], kv_layout="HND",
                                                                  use_tensor_cores=tc, sm_scale=scale)
            else:
                workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=q.device)
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=tc)
                indptr = torch.arange(B + 1, dtype=torch.int32, device=q.device)
                indices = torch.arange(B, dtype=torch.int32, device=q.device)
                last = torch.full((B,), L, dtype=torch.int32, device=q.device)
                wrapper.plan(indptr, indices, last, Hq, Hkv, D, L, q_data_type=q.dtype, kv_data_type=k.dtype,
                             sm_scale=scale)

                def fn(wrapper=wrapper):
                    return wrapper.run(q, (k, v))
            fn()
            torch.cuda.synchronize()
            fns[name] = fn
        except Exception as e:  # noqa: BLE001 - report, do not crash the run
            errors.append(f"{name}: {type(e).__name__}: {e}"[:300])
    return fns, "; ".join(errors) or None


# ---------------------------------------------------------------------- one configuration
def _make_profile(args, shape, dtype, batch, length, device):
    label, hq, hkv, d = shape
    if args.profile == "replay":
        from twilight_bench.profiles import capture_replay, replay_path

        path = args.replay_capture or replay_path()
        if not os.path.exists(path):
            capture_replay(path=path)
        prof = ReplayProfile(path, length, batch=batch, layer=args.replay_layer, dtype=dtype, device=device)
        if (prof.num_q_heads, prof.num_kv_heads, prof.head_dim) != (hq, hkv, d):
            return None
        return prof
    return SyntheticProfile(batch, hq, hkv, d, length, dtype=dtype, device=device, growth=args.growth)


def _bytes_per_token(cache, kind: str) -> float:
    """Bytes one estimate reads per candidate token and kv-head."""
    if kind == "int4":
        return cache.head_dim / 2 + 2 * cache.k_qparams.element_size()
    if kind == "int8":
        return cache.head_dim + 2 * cache.k_qparams.element_size()
    return cache.head_dim * cache.k.element_size()


def bench_config(args, shape, dtype: torch.dtype, batch: int, length: int, device: torch.device,
                 peak_gbps: float) -> dict:
    """Benchmark one (shape, dtype, batch, context); returns one result row."""
    label, hq, hkv, d = shape
    row = {"shape": label, "num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d, "dtype": DTYPE_NAMES[dtype],
           "batch": batch, "context": length, "profile": args.profile, "skipped": {}}
    elt = torch.empty(0, dtype=dtype).element_size()
    kv_bytes = 2 * batch * hkv * length * d * elt
    row["kv_bytes"] = kv_bytes
    avail = common.available_memory_bytes(device) * args.memory_fraction
    need = 1.35 * kv_bytes + 4 * 4 * hq * length
    if need > avail:
        row["skipped"]["all"] = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB usable"
        return row
    prof = _make_profile(args, shape, dtype, batch, length, device)
    if prof is None:
        row["skipped"]["all"] = "the replay capture's head shape differs"
        return row

    pipes = {name: TwilightPipeline(variant_config(name, args), 1, hq, hkv) for name in ("dense", *SPARSE_VARIANTS)}
    t0 = time.perf_counter()
    cache = pipes["quest-twilight"].new_cache(0, batch, hkv, d, dtype=dtype, device=device)  # int4 + page bounds
    for kc, vc in prof.chunks():
        cache.append(kc, vc)
    del kc, vc
    common.synchronize(device)
    row["prefill_s"] = time.perf_counter() - t0
    q, scale = prof.query(), prof.scale
    keys, values = cache.keys(), cache.values()
    if not keys.is_contiguous():  # capacity rounded past the length: dense baselines get exact-size tensors
        keys, values = keys.contiguous(), values.contiguous()
    row["oracle_budget"] = budget_summary(oracle_top_p_budgets(q, keys, scale, args.p))
    if hasattr(prof, "hot_counts"):
        row["profile_hot_tokens"] = budget_summary(prof.hot_counts)

    left = common.available_memory_bytes(device) * args.memory_fraction
    G = hq // hkv
    fns, skipped = dense_baselines(q, keys, values, scale, expanded_ok=G * kv_bytes < 0.6 * left,
                                   dynamic_ok=not args.no_dynamic_baseline and 1.2 * kv_bytes < left)
    row["skipped"].update(skipped)
    if args.no_dynamic_baseline:
        row["skipped"]["sdpa-dynamic-cat"] = "--no-dynamic-baseline"
    for name, pipe in pipes.items():
        key = "dense-preset" if name == "dense" else name
        fns[key] = (lambda pipe=pipe, cache=cache: pipe.decode(0, q, cache, scale))
    row["backend"] = pipes["quest-twilight"].backend(device).name

    times = common.measure(fns, device, warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats,
                           max_seconds=args.max_seconds)
    row["times"] = {k: t.to_dict() for k, t in times.items()}
    dense_names = [n for n in DENSE_CANDIDATES if n in times]
    best = min(dense_names, key=lambda n: times[n].median_ms)
    row["dense_baseline"] = best
    dense_ms = times[best].median_ms

    # Budgets: one recorded decode per sparse preset.
    row["budgets"] = {}
    for name in SPARSE_VARIANTS:
        pipe = pipes[name]
        pipe.stats.reset()
        pipe.decode(0, q, cache, scale)
        st = pipe.stats.as_dict()
        cand = pipe.select(0, q, cache).counts.double()
        row["budgets"][name] = {"mean": st["mean_attended_tokens"], "min": st["min_attended_tokens"],
                                "max": st["max_attended_tokens"], "mean_kv_tokens_read": st["mean_kv_tokens_read"],
                                "mean_candidates": float(cand.mean())}

    # What one steady-state decode step asks of the device: ops, host syncs (where), Triton launches.
    row["ops_per_step"] = {}
    for name, pipe in pipes.items():
        row["ops_per_step"]["dense-preset" if name == "dense" else name] = common.step_counts(
            lambda pipe=pipe, cache=cache: pipe.decode(0, q, cache, scale), device)

    # Stages, bytes and bandwidth.
    stage_fns, stage_bytes = {}, {}
    for name in SPARSE_VARIANTS:
        fns_v, bytes_v = _stage_callables(pipes[name], q, cache, scale, args.p)
        stage_fns.update({f"{name}/{s}": f for s, f in fns_v.items()})
        stage_bytes[name] = bytes_v
    if not args.no_stages:
        st_times = common.measure(stage_fns, device, warmup=args.warmup, repeats=args.repeats,
                                  min_repeats=args.min_repeats, max_seconds=args.max_seconds)
        row["stages"] = {}
        for name in SPARSE_VARIANTS:
            row["stages"][name] = {}
            for s in STAGES:
                key = f"{name}/{s}"
                if key in st_times:
                    t = st_times[key]
                    b = stage_bytes[name].get(s, 0)
                    gbps = b / (t.median_ms * 1e-3) / 1e9 if t.median_ms > 0 else 0.0
                    row["stages"][name][s] = {**t.to_dict(), "bytes": b, "gbps": gbps, "roofline": gbps / peak_gbps}
    row["bytes"] = {"dense": kv_bytes, **{n: sum(stage_bytes[n].values()) for n in SPARSE_VARIANTS}}
    row["bandwidth"] = {}
    for name, b in (("dense", kv_bytes), *((n, row["bytes"][n]) for n in SPARSE_VARIANTS)):
        ms = dense_ms if name == "dense" else times[name].median_ms
        gbps = b / (ms * 1e-3) / 1e9
        row["bandwidth"][name] = {"gbps": gbps, "roofline": gbps / peak_gbps}
    row["speedup"] = {}
    for name in (*SPARSE_VARIANTS, "dense-preset"):
        ms = times[name].median_ms
        row["speedup"][name] = {"vs_dense": dense_ms / ms, "vs_quest": times["quest"].median_ms / ms}
        if "sdpa-dynamic-cat" in times:
            row["speedup"][name]["vs_dynamic_cat"] = times["sdpa-dynamic-cat"].median_ms / ms
    fi = [n for n in ("flashinfer-dense", "flashinfer-dense-tc") if n in times]
    if fi:
        fi_ms = min(times[n].median_ms for n in fi)
        for name in SPARSE_VARIANTS:
            row["speedup"][name]["vs_flashinfer"] = fi_ms / times[name].median_ms
    if "sdpa-dynamic-cat" in times:
        row["cache_handling_gain"] = times["sdpa-dynamic-cat"].median_ms / dense_ms
    del fns, stage_fns, cache, keys, values, pipes
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _stage_callables(pipe: TwilightPipeline, q, cache, scale: float, p: float):
    """``({stage: fn}, {stage: bytes})`` for one sparse preset, on its own intermediate results."""
    cfg = pipe.config
    backend = pipe.backend(q.device)
    B, Hq, D = q.shape
    plan = pipe.plan(cache, scale=scale)
    sel = pipe.select(0, q, cache, plan)
    fns: dict[str, Callable] = {"select": lambda: pipe.select(0, q, cache, plan)}
    nbytes: dict[str, float] = {}
    n_cand = float(sel.counts.double().sum())  # candidate (b, kv-head, token) triples
    if cfg.selector.type == "quest" and not sel.is_full_range:
        nbytes["select"] = cache.batch * cache.num_kv_heads * cache.num_pages * 2 * D * cache.page_bounds.element_size()
    else:
        nbytes["select"] = 0.0
    kv_tok = 2 * D * cache.k.element_size()
    if cfg.pruner.type == "none":
        nbytes["attend"] = n_cand * kv_tok
        fns["attend"] = lambda: backend.attend(q, cache, sel, scale, plan)
        return fns, nbytes
    kind = cfg.estimator.type
    logits = backend.estimate(q, cache, sel, kind, plan) * scale
    pruned, _ = pipe.prune(q, cache, sel, scale, plan)
    fns["estimate"] = lambda: backend.estimate(q, cache, sel, kind, plan)
    fns["prune"] = lambda: backend.prune_top_p(logits, p)
    fns["attend"] = lambda: backend.attend(q, cache, pruned, scale, plan)
    nbytes["estimate"] = n_cand * _bytes_per_token(cache, kind)
    nbytes["prune"] = n_cand * (Hq // cache.num_kv_heads) * logits.element_size()
    nbytes["attend"] = float(pruned.counts.double().sum()) * kv_tok
    return fns, nbytes


# ---------------------------------------------------------------------- goals
def evaluate_goals(rows: list[dict], device_type: str) -> list[dict]:
    """Compare the measured rows with ``GOALS``; a goal not measured in this run says so."""
    goals = []
    done = [r for r in rows if "times" in r]
    if device_type != "cuda":
        for ctx, target in GOALS["cpu"].items():
            r = next((r for r in done if r["shape"] == "llama3-8b" and r["batch"] == 1 and r["context"] == ctx), None)
            goal = f"CPU, batch 1, Llama-3-8B heads, {size_label(ctx)}: quest-twilight >= {target:g}x dense SDPA"
            if r is None:
                goals.append({"goal": goal, "met": None, "measured": None, "note": "not measured in this run"})
            else:
                s = r["speedup"]["quest-twilight"]["vs_dense"]
                goals.append({"goal": goal, "met": s >= target, "measured": s,
                              "note": f"{s:.2f}x against {r['dense_baseline']} ({r['dtype']})"})
        return goals
    g = GOALS["gpu"]
    cands = [r for r in done if r["shape"] == "llama3-8b" and r["batch"] == g["batch"] and r["context"] == g["context"]]
    if not cands:
        goals.append({"goal": "GPU, 32k, batch 64, Llama-3-8B heads", "met": None, "measured": None,
                      "note": "not measured in this run"})
        return goals
    for r in cands:
        tag = f"GPU {r['dtype']}, 32k, batch 64, Llama-3-8B heads"
        sp = r["speedup"]["quest-twilight"]
        if "vs_flashinfer" in sp:
            goals.append({"goal": f"{tag}: quest-twilight >= {g['vs_flashinfer']:g}x FlashInfer dense decode",
                          "met": sp["vs_flashinfer"] >= g["vs_flashinfer"], "measured": sp["vs_flashinfer"],
                          "note": f"{sp['vs_flashinfer']:.2f}x"})
        else:
            goals.append({"goal": f"{tag}: quest-twilight >= {g['vs_flashinfer']:g}x FlashInfer dense decode",
                          "met": None, "measured": sp["vs_dense"],
                          "note": f"FlashInfer unavailable; {sp['vs_dense']:.2f}x against {r['dense_baseline']}"})
        goals.append({"goal": f"{tag}: quest-twilight >= {g['vs_quest']:g}x Quest alone",
                      "met": sp["vs_quest"] >= g["vs_quest"], "measured": sp["vs_quest"],
                      "note": f"{sp['vs_quest']:.2f}x"})
        stages = (r.get("stages") or {}).get("quest-twilight", {})
        fracs = {s: v["roofline"] for s, v in stages.items() if v.get("bytes")}
        if fracs:
            worst = min(fracs, key=fracs.get)
            goals.append({"goal": f"{tag}: every quest-twilight kernel >= {100 * g['roofline']:.0f}% of the "
                                  "bandwidth roofline",
                          "met": all(f >= g["roofline"] for f in fracs.values()), "measured": fracs,
                          "note": ", ".join(f"{s} {100 * f:.0f}%" for s, f in fracs.items())
                                  + f" (lowest: {worst})"})
    return goals


# ---------------------------------------------------------------------- report
def _budget(b: dict | None) -> str:
    if not b:
        return "—"
    return f"{b['mean']:.0f} ({b['min']:.0f}–{b['max']:.0f})"


def markdown_report(result: dict) -> str:
    env, rows, peak = result["env"], result["rows"], result["peak_bandwidth"]
    lines = ["# Kernel microbenchmark: one layer's decode attention", "",
             common.environment_markdown(env, peak), "",
             f"Profile: {result['args']['profile']}; selector budget {result['args']['token_budget']} tokens, "
             f"page size {result['args']['page_size']}, top-p {result['args']['p']}; backend "
             f"`{result['args']['backend']}`. Times are medians ± half the IQR over interleaved repeats, in ms. "
             "*dense* is the fastest dense baseline on a preallocated K/V (named); *dyn-cat* re-concatenates the "
             "K/V every step like transformers' default cache (not a baseline); *QT* = quest-twilight. Budgets: "
             "tokens attended per query head, mean (min–max); *oracle*: exact top-p on the exact softmax.", ""]
    head = ["shape", "dtype", "B", "ctx", "dense", "dyn-cat", "dense preset", "quest", "QT", "twilight",
            "QT/dense", "QT/quest", "QT budget", "twilight budget", "oracle budget", "dense GB/s (roofline)",
            "QT GB/s (roofline)"]
    body = []
    for r in rows:
        base = [r["shape"], r["dtype"], r["batch"], size_label(r["context"])]
        if "times" not in r:
            body.append(base + [f"skipped: {r['skipped'].get('all', '?')}"] + [""] * (len(head) - 5))
            continue
        t = r["times"]
        bw, dbw = r["bandwidth"]["quest-twilight"], r["bandwidth"]["dense"]
        body.append(base + [
            f"{fmt_ms(t[r['dense_baseline']])} ({r['dense_baseline']})", fmt_ms(t.get("sdpa-dynamic-cat")),
            fmt_ms(t["dense-preset"]), fmt_ms(t["quest"]), fmt_ms(t["quest-twilight"]), fmt_ms(t["twilight"]),
            f"**{r['speedup']['quest-twilight']['vs_dense']:.2f}x**",
            f"{r['speedup']['quest-twilight']['vs_quest']:.2f}x",
            _budget(r["budgets"]["quest-twilight"]), _budget(r["budgets"]["twilight"]), _budget(r["oracle_budget"]),
            f"{dbw['gbps']:.1f} ({100 * dbw['roofline']:.0f}%)", f"{bw['gbps']:.1f} ({100 * bw['roofline']:.0f}%)"])
    lines += [markdown_table(head, body), ""]
    # All dense formulations, and the cache-handling gain.
    dense_cols = [n for n in (*DENSE_CANDIDATES, "sdpa-dynamic-cat", "dense-preset")
                  if any(n in r.get("times", {}) for r in rows)]
    body = []
    for r in rows:
        if "times" not in r:
            continue
        body.append([r["shape"], r["dtype"], r["batch"], size_label(r["context"])]
                    + [fmt_ms(r["times"].get(n)) for n in dense_cols]
                    + [f"{r['cache_handling_gain']:.2f}x" if "cache_handling_gain" in r else "—"]
                    + [f"{r['load_average'][0]:.1f}" if r.get("load_average") else "—"])
    if body:
        lines += ["## Dense formulations", "",
                  "The same attention in every formulation; the fastest preallocated one is the baseline. "
                  "*cache gain* = dyn-cat / dense: what a speed-up measured against the growing cache would owe "
                  "to cache handling alone. *load*: the machine's 1-minute load average after the row (CPU; "
                  "above the core count, other processes competed for the cores).", "",
                  markdown_table(["shape", "dtype", "B", "ctx", *dense_cols, "cache gain", "load"], body), ""]
    body = []
    for r in rows:
        for name, stages in (r.get("stages") or {}).items():
            cells = []
            for s in STAGES:
                v = stages.get(s)
                cells.append("—" if v is None else
                             f"{fmt_ms(v, spread=False)}" + (f" ({100 * v['roofline']:.0f}%)" if v["bytes"] else ""))
            total = sum(v["median_ms"] for v in stages.values())
            body.append([r["shape"], r["dtype"], r["batch"], size_label(r["context"]), name, *cells,
                         f"{total:.3g}", fmt_ms(r["times"][name], spread=False),
                         f"{r['budgets'][name]['mean_candidates']:.0f}",
                         f"{r['budgets'][name]['mean_kv_tokens_read']:.0f}"])
    if body:
        lines += ["## Stages", "",
                  "Median ms per stage (achieved bandwidth as a share of the roofline, where the stage moves "
                  "bytes); *sum* of the stages against the whole *operator*; candidates and kv-tokens read per "
                  "kv-head.", "",
                  markdown_table(["shape", "dtype", "B", "ctx", "preset", *STAGES, "sum", "operator", "candidates",
                                  "kv read"], body), ""]
    lines += _ops_section(rows)
    lines += ["## Goals", ""]
    for g in result["goals"]:
        mark = {True: "met", False: "**not met**", None: "not measured"}[g["met"]]
        lines.append(f"- {g['goal']}: {mark} — {g['note']}")
    return "\n".join(lines) + "\n"


OPS_PRESETS = ("dense-preset", *SPARSE_VARIANTS)


def _ops_cell(c: dict | None) -> str:
    return "—" if not c else f"{c['ops']} / {c['syncs']} / {c['launches']}"


def _ops_section(rows: list[dict]) -> list[str]:
    """The "Ops per decode step" table and the places that synchronise (one line per preset and site)."""
    counted = [r for r in rows if r.get("ops_per_step")]
    if not counted:
        return []
    body = [[r["shape"], r["dtype"], r["batch"], size_label(r["context"]), r.get("backend", "—")]
            + [_ops_cell(r["ops_per_step"].get(n)) for n in OPS_PRESETS] for r in counted]
    lines = ["## Ops per decode step", "",
             "One steady-state `pipe.decode` call of one layer, after the timed calls: aten ops that do work "
             "(views and allocations not counted) / host synchronisations / Triton kernel launches "
             "(`twilight.diagnostics.count_ops`). On a GPU a sync is a wait for the device (scalar reads, "
             "data-dependent sizes, device-to-host copies); on the CPU the same count is the step's host reads "
             "of tensor values, which the torch backend makes on purpose there.", "",
             markdown_table(["shape", "dtype", "B", "ctx", "backend", *OPS_PRESETS], body), ""]
    sites: dict[str, dict[tuple[str, str], int]] = {}
    for r in counted:
        for name in OPS_PRESETS:
            for s in (r["ops_per_step"].get(name) or {}).get("sync_sites", []):
                key = (s["op"], s["where"])
                sites.setdefault(name, {})[key] = sites.setdefault(name, {}).get(key, 0) + s["n"]
    if sites:
        lines += ["Where the syncs happen (summed over the rows):", ""]
        for name in OPS_PRESETS:
            for (op, where), n in sorted(sites.get(name, {}).items(), key=lambda kv: -kv[1])[:6]:
                lines.append(f"- {name}: `{op}` at `{where}` (x{n})")
        lines.append("")
    return lines


def plot(result: dict, path: str) -> str | None:
    """Latency against context per (shape, dtype, batch), quest-twilight's speed-up annotated."""
    plt = common.pyplot()
    if plt is None:
        return None
    rows = [r for r in result["rows"] if "times" in r]
    if not rows:
        return None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["batch"]), []).append(r)
    n = len(groups)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    styles = {"dense": ("black", "-", "o"), "sdpa-dynamic-cat": ("grey", ":", "x"), "quest": ("tab:blue", "-", "s"),
              "quest-twilight": ("tab:red", "-", "D"), "twilight": ("tab:green", "--", "^")}
    for ax, ((shape, dtype, batch), rs) in zip(axes.flat, sorted(groups.items()), strict=False):
        rs = sorted(rs, key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        for name, (color, ls, marker) in styles.items():
            ts = [r["times"].get(r["dense_baseline"] if name == "dense" else name) for r in rs]
            if any(t is None for t in ts):
                continue
            y = [t["median_ms"] for t in ts]
            err = [[t["median_ms"] - t["p25_ms"] for t in ts], [t["p75_ms"] - t["median_ms"] for t in ts]]
            label = f"dense ({rs[-1]['dense_baseline']})" if name == "dense" else name
            ax.errorbar(x, y, yerr=err, color=color, ls=ls, marker=marker, ms=4, capsize=2, label=label)
        for r in rs:
            s = r["speedup"]["quest-twilight"]["vs_dense"]
            ax.annotate(f"{s:.1f}x", (r["context"], r["times"]["quest-twilight"]["median_ms"]),
                        textcoords="offset points", xytext=(4, -12), color="tab:red", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [size_label(c) for c in x])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"{shape}, {dtype}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"Decode attention, {result['env']['device_name']} ({result['env']['date'][:10]}); "
                 "quest-twilight speed-up over dense in red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- entry points
def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (from ``add_arguments``); writes and returns the results."""
    args = _defaults(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    env = common.environment(device)
    out = args.out or common.default_out_dir(env)
    os.makedirs(out, exist_ok=True)
    say(f"device: {env['device_name']}; writing to {out}")
    peak = common.peak_bandwidth(device, env, nbytes=args.bandwidth_mib * 2**20)
    say(f"bandwidth peak: {peak['peak_gbps']:.1f} GB/s ({peak['source']})")
    rows = []
    with torch.inference_mode():
        for shape_name in args.shapes:
            shape = parse_shape(shape_name)
            for dtype_name in args.dtypes:
                for batch in args.batches:
                    for length in args.contexts:
                        t0 = time.perf_counter()
                        row = bench_config(args, shape, DTYPES[dtype_name], batch, length, device, peak["peak_gbps"])
                        row["wall_s"] = time.perf_counter() - t0
                        row["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
                        rows.append(row)
                        say(_row_line(row))
    result = {"benchmark": "kernels", "env": env, "peak_bandwidth": peak,
              "args": {k: v for k, v in vars(args).items()}, "rows": rows}
    result["goals"] = evaluate_goals(rows, device.type)
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    common.write_json(os.path.join(out, "kernels.json"), result)
    with open(os.path.join(out, "kernels.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(result))
    if not args.no_plot:
        plot(result, os.path.join(out, "kernels.png"))
    say(f"wrote {out}/kernels.json, kernels.md" + ("" if args.no_plot else ", kernels.png"))
    for g in result["goals"]:
        say(f"goal: {g['goal']}: {g['met']} ({g['note']})")
    result["out"] = out
    return result


def _row_line(r: dict) -> str:
    head = f"{r['shape']:>10} {r['dtype']} B={r['batch']:<3} {size_label(r['context']):>5}"
    if "times" not in r:
        return f"{head}  skipped: {r['skipped'].get('all')}"
    t = r["times"]
    return (f"{head}  dense {t[r['dense_baseline']]['median_ms']:8.3f} ms ({r['dense_baseline']})  "
            f"quest {t['quest']['median_ms']:8.3f}  QT {t['quest-twilight']['median_ms']:8.3f} "
            f"({r['speedup']['quest-twilight']['vs_dense']:.2f}x dense, "
            f"{r['speedup']['quest-twilight']['vs_quest']:.2f}x quest)  twilight {t['twilight']['median_ms']:8.3f}  "
            f"QT budget {_budget(r['budgets']['quest-twilight'])}  oracle {_budget(r['oracle_budget'])}  "
            f"QT ops/syncs/launches {_ops_cell((r.get('ops_per_step') or {}).get('quest-twilight'))}  "
            f"[{r['wall_s']:.0f}s]")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
