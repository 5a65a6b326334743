"""Does top-p help selector X? Every selector alone and with Twilight's top-p, at fixed budgets, on one table.

One command runs it on the embedded model (SmolLM2-135M-Instruct, CPU) and writes the table, its data and
its plot::

    python scripts/selector_table.py --out benchmarks/results/selectors-smollm2

For each selector of ``SELECTORS`` and each budget of ``BUDGETS`` it evaluates two configs on the same samples:
the selector alone (exact K/V over its ``token_budget`` candidates) and the selector followed by Twilight's
pruner (int4 estimate, top-p ``TOP_P``), plus the dense baseline. The samples are RULER's needle tasks
(``--tasks``) and passkey retrieval at ``--lengths``; each prompt is prefilled once and decoded under every
config (``twilight eval --share-prefill``), and both runs resume when the command is run again.

Outputs in ``--out``: ``configs/*.json`` (what was run), ``ruler/`` and ``passkey/`` (the eval runs: per-sample
JSONL, summaries), ``selectors.md`` (the table), ``selectors.json`` (its numbers) and ``selectors.png``.
Budgets are per kv-head: Quest rounds them up to whole pages; streaming keeps 4 sink tokens and a window of
``budget - 4``; SnapKV keeps ``budget`` prompt tokens plus every generated token; H2O splits the budget evenly
between heavy hitters and recent tokens; TidalDecode's re-selection layers attend to every token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence

SELECTORS = ("quest", "double_sparse", "streaming", "oracle_topk", "sparq", "tidal", "snapkv", "h2o")
BUDGETS = (64, 256, 1024)
TOP_P = 0.85
NEEDLE_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue")
STREAMING_SINKS = 4


def config_name(selector: str, budget: int, top_p: float | None) -> str:
    return f"{selector}-{budget}" + (f"-p{round(top_p * 100)}" if top_p else "")


def selector_config(selector: str, budget: int, top_p: float | None, channels_path: str | None = None) -> dict:
    """The config of ``selector`` at ``budget`` (per kv-head), alone or followed by top-p ``top_p``."""
    sel: dict = {"type": selector, "token_budget": budget}
    if selector == "streaming":
        sel = {"type": "streaming", "sink_tokens": STREAMING_SINKS, "window": budget - STREAMING_SINKS}
    elif selector == "double_sparse":
        if not channels_path:
            raise ValueError("double_sparse needs channels_path (calibrate_channels writes one)")
        sel["channels_path"] = channels_path
    pruner = {"type": "top_p", "p": top_p} if top_p else {"type": "none"}
    return {"selector": sel, "estimator": {"type": "int4" if top_p else "exact"}, "pruner": pruner,
            "dense_layers": [0, 1], "dense_below": 0, "name": config_name(selector, budget, top_p)}


def write_configs(out_dir: str, selectors: Sequence[str], budgets: Sequence[int], top_p: float,
                  channels_path: str | None = None) -> list[str]:
    """One JSON file per (selector, budget, alone / top-p) in ``out_dir``; returns their paths."""
    from twilight import TwilightConfig

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for selector in selectors:
        for budget in budgets:
            for p in (None, top_p):
                cfg = selector_config(selector, budget, p, channels_path)
                TwilightConfig.load(cfg)  # validate before anything runs
                path = os.path.join(out_dir, cfg["name"] + ".json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(cfg, f, indent=2)
                    f.write("\n")
                paths.append(path)
    return paths


def calibrate_channels(model, tokenizer, path: str, tokens: int = 2048, num_channels: int = 16) -> str:
    """Double Sparsity's label channels of ``model``, calibrated on the package's essay text."""
    import torch

    from twilight.integrations.capture import calibrate_double_sparse

    from .common import data_text
    ids = tokenizer(data_text("essays.txt"), return_tensors="pt")["input_ids"][:, :tokens]
    with torch.inference_mode():
        calibrate_double_sparse(model, ids, num_channels=num_channels, path=path)
    return path


# --------------------------------------------------------------------------- the table

def parse_name(name: str) -> tuple[str, int, float | None] | None:
    """``(selector, budget, top_p)`` of a ``config_name``; ``None`` for other names (dense)."""
    parts = name.split("-")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    top_p = int(parts[2][1:]) / 100 if len(parts) > 2 and parts[2].startswith("p") else None
    return parts[0], int(parts[1]), top_p


def collect(records: Iterable[dict]) -> dict:
    """Scores and budgets per config and length from eval records (latest per sample id and config).

    Returns ``{"lengths": [...], "configs": {name: {"score": {L: %}, "attended": {L: tokens},
    "context": {L: tokens}, "samples": {L: n}}}}``; ``"all"`` holds the mean over every sample.
    """
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if r.get("error") is None:  # failed samples are redone on resume, never scored
            latest[(r["id"], r["config"])] = r
    acc: dict = defaultdict(lambda: defaultdict(list))
    lengths = set()
    for r in latest.values():
        budget = r.get("budget") or {}
        for key in (r["length"], "all"):
            acc[r["config"]][("score", key)].append(100.0 * r["score"])
            acc[r["config"]][("attended", key)].append(budget.get("mean_attended_tokens", math.nan))
            acc[r["config"]][("context", key)].append(budget.get("mean_context_tokens", math.nan))
        lengths.add(r["length"])
    out: dict = {"lengths": sorted(lengths), "configs": {}, "gain": top_p_gain(latest.values())}
    for name, cells in acc.items():
        row: dict = {"score": {}, "attended": {}, "context": {}, "samples": {}}
        for (what, key), values in cells.items():
            row[what][str(key)] = sum(values) / len(values)
            row["samples"][str(key)] = len(values)
        out["configs"][name] = row
    return out


def top_p_gain(records: Iterable[dict]) -> dict:
    """Per selector and budget: the score with top-p minus the score alone on the same samples (percentage
    points), with a 95% paired bootstrap interval (``report.paired_bootstrap``)."""
    from .report import paired_bootstrap

    scores: dict = defaultdict(dict)  # (selector, budget) -> {top_p or None: {sample id: score}}
    for r in records:
        parsed = parse_name(r["config"])
        if parsed:
            scores[parsed[:2]].setdefault(parsed[2], {})[r["id"]] = r["score"]
    gain = {}
    for (selector, budget), by_p in scores.items():
        alone = by_p.get(None, {})
        for p, pruned in by_p.items():
            common = sorted(set(alone) & set(pruned)) if p else []
            if common:
                gain[config_name(selector, budget, None)] = paired_bootstrap(
                    [100.0 * (pruned[i] - alone[i]) for i in common])
    return gain


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(data: dict, dense: str = "dense") -> str:
    """The table: one row per selector and budget, alone and with top-p side by side."""
    lengths = [str(L) for L in data["lengths"]]
    cfgs = data["configs"]
    head = ["selector", "budget"] + [f"alone {int(L) // 1024}k" for L in lengths] + ["alone", "attended"] + \
        [f"top-p {int(L) // 1024}k" for L in lengths] + ["top-p", "attended", "Δ score [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|"]
    if dense in cfgs:
        d = cfgs[dense]
        cells = [_fmt(d["score"].get(L)) for L in lengths] + [_fmt(d["score"]["all"]), _fmt(d["attended"]["all"], 0)]
        lines.append("| **dense** | all | " + " | ".join(cells + [""] * (len(lengths) + 3)) + " |")
    rows = sorted({p[:2] for n in cfgs if (p := parse_name(n))}, key=lambda sb: (SELECTORS.index(sb[0])
                                                                                 if sb[0] in SELECTORS else 99, sb[1]))
    for selector, budget in rows:
        alone = cfgs.get(config_name(selector, budget, None))
        tp = next((cfgs[n] for n in cfgs if (p := parse_name(n)) and p[:2] == (selector, budget) and p[2]), None)
        cells = [selector, str(budget)]
        for row in (alone, tp):
            cells += [_fmt(row["score"].get(L)) if row else "–" for L in lengths]
            cells += [_fmt(row["score"]["all"]) if row else "–", _fmt(row["attended"]["all"]) if row else "–"]
        g = data.get("gain", {}).get(config_name(selector, budget, None))
        cells.append(f"{g['delta']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]" if g and g["samples"] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str, dense: str = "dense") -> None:
    """Accuracy against mean attended tokens: one colour per selector, hollow alone, filled with top-p."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = data["configs"]
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab10")
    for i, selector in enumerate(SELECTORS):
        for top_p, style in ((None, "--"), (TOP_P, "-")):
            pts = sorted((parse_name(n)[1], c["attended"]["all"], c["score"]["all"]) for n, c in cfgs.items()
                         if (p := parse_name(n)) and p[0] == selector and bool(p[2]) == bool(top_p))
            if not pts:
                continue
            ax.plot([x for _, x, _ in pts], [y for _, _, y in pts], style, marker="o", color=colors(i),
                    markerfacecolor=colors(i) if top_p else "white",
                    label=f"{selector}" + (f" + top-p {top_p}" if top_p else ""))
    if dense in cfgs:
        ax.axhline(cfgs[dense]["score"]["all"], color="black", lw=1, label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("mean attended tokens per head and decode step (log)")
    ax.set_ylabel("accuracy (%), mean over tasks and lengths")
    ax.set_title("Selectors alone (hollow, dashed) and with Twilight's top-p (filled)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/selector_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "selectors-smollm2"))
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--tasks", nargs="+", default=list(NEEDLE_TASKS), help="RULER tasks")
    p.add_argument("--depths", nargs="+", type=int, default=[25, 75], help="passkey depths (percent)")
    p.add_argument("--samples", type=int, default=1, help="samples per task x length (x depth)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--protocol", default="decode-question", choices=("decode-question", "dense-prefill"),
                   help="twilight eval --protocol (the committed table predates it: dense-prefill)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from . import cli
    from .modeling import default_model_id, load_model, max_context

    args = build_parser().parse_args(argv)
    if any(b < 1 for b in args.budgets) or not 0 < args.top_p <= 1:
        print("error: --budgets must be >= 1 and --top-p in (0, 1]", file=sys.stderr)
        return 2
    model_id = args.model or default_model_id()
    os.makedirs(args.out, exist_ok=True)
    channels = None
    if "double_sparse" in args.selectors:
        channels = os.path.join(args.out, "configs", "double_sparse_channels.json")
        if not os.path.exists(channels):
            os.makedirs(os.path.dirname(channels), exist_ok=True)
            model, tokenizer = load_model(model_id)
            calibrate_channels(model, tokenizer, channels, tokens=min(2048, max_context(model) or 2048))
            del model
    configs = write_configs(os.path.join(args.out, "configs"), args.selectors, args.budgets, args.top_p, channels)
    common = ["--model", model_id, "--configs", *configs, "--lengths", *map(str, args.lengths),
              "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens), "--no-plots",
              "--protocol", args.protocol]
    if args.no_progress:
        common.append("--no-progress")
    runs = {"ruler": ["ruler", "--tasks", *args.tasks], "passkey": ["passkey", "--depths", *map(str, args.depths)]}
    records = []
    for name, task_args in runs.items():
        out = os.path.join(args.out, name)
        reported: list[dict] = []   # this run's records only, not those of other runs in the same --out
        rc = cli.main([*task_args, *common, "--out", out], collect=reported)
        if rc:
            return rc
        records += reported
    wanted = {os.path.splitext(os.path.basename(p))[0] for p in configs} | {"dense"}
    data = collect(r for r in records if r["config"] in wanted and r["length"] in args.lengths)
    data["setup"] = {"model": model_id, "tasks": args.tasks, "passkey_depths": args.depths,
                     "samples": args.samples, "max_new_tokens": args.max_new_tokens, "top_p": args.top_p}
    with open(os.path.join(args.out, "selectors.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    table = render_markdown(data)
    with open(os.path.join(args.out, "selectors.md"), "w", encoding="utf-8") as f:
        f.write(table)
    plot(data, os.path.join(args.out, "selectors.png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
