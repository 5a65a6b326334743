"""Summaries of a run: ``summary.json``, ``results.md`` and PNG plots next to the JSONL.

Scores are aggregated by the task (mean percent, or perplexity over all scored tokens) per
configuration x row group (RULER task, passkey depth, LongBench dataset) x length; the
average row is the mean over groups, as RULER and LongBench report it. Budgets are the
per-sample means of ``twilight.budget_stats`` over decode steps, averaged over samples.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .tasks.base import Task

#: The files ``write_reports`` may write in ``--out`` (beside the records).
OUTPUT_FILES = ("summary.json", "results.md", "accuracy_vs_length.png", "budget.png", "budget_per_layer.png")
LAYER_KEYS = ("mean_attended_tokens", "attended_tokens", "mean_attended", "attended")


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)


def _layer_value(item: Any) -> float | None:
    if isinstance(item, (int, float)):
        return float(item)
    if isinstance(item, dict):
        for key in LAYER_KEYS:
            if isinstance(item.get(key), (int, float)):
                return float(item[key])
    return None


def budget_summary(records: Sequence[dict]) -> dict:
    """Mean decode-step budget over records (``None`` fields where the library recorded nothing)."""
    budgets = [r.get("budget") or {} for r in records]
    out = {key: _round(_mean([b.get(key) for b in budgets]), 4)
           for key in ("mean_attended_tokens", "mean_context_tokens", "attended_fraction")}
    out["decode_steps"] = _round(_mean([b.get("decode_steps") for b in budgets]), 1)
    out["question_tokens"] = _round(_mean([r.get("question_tokens") for r in records]), 1)
    layers = [[_layer_value(x) for x in b.get("per_layer") or []] for b in budgets]
    layers = [ls for ls in layers if ls and all(v is not None for v in ls)]
    if layers and len({len(ls) for ls in layers}) == 1:
        out["per_layer_attended_tokens"] = [_round(_mean(col), 2) for col in zip(*layers, strict=True)]
    return out


BASELINE = "dense"
BOOTSTRAP_RESAMPLES = 2000


def paired_bootstrap(deltas: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean of paired per-sample differences with a percentile bootstrap confidence interval.

    Resamples the samples (pairs) with replacement ``resamples`` times; the interval holds the middle
    ``confidence`` of the resampled means. Deterministic in ``seed``.

    Example::

        >>> paired_bootstrap([0.0, 0.0, 0.0])
        {'delta': 0.0, 'low': 0.0, 'high': 0.0, 'samples': 3}
    """
    import random

    n = len(deltas)
    if not n:
        return {"delta": None, "low": None, "high": None, "samples": 0}
    rng = random.Random(seed)
    means = sorted(sum(deltas[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    lo, hi = means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]
    return {"delta": _round(sum(deltas) / n, 4), "low": _round(lo, 4), "high": _round(hi, 4), "samples": n}


def paired_differences(records: Sequence[dict], config_names: Sequence[str], lengths: Sequence[int],
                       baseline: str = BASELINE) -> dict:
    """Per config: its score minus the baseline's on the same samples (percentage points), per length and over
    all, with a 95% paired bootstrap interval (``paired_bootstrap``)."""
    base = {(r["id"], r["fingerprint"]): r["score"] for r in records if r["config"] == baseline}
    out: dict[str, dict] = {}
    for name in config_names:
        if name == baseline:
            continue
        pairs = [(r["length"], 100.0 * (r["score"] - base[(r["id"], r["fingerprint"])])) for r in records
                 if r["config"] == name and (r["id"], r["fingerprint"]) in base]
        if pairs:
            out[name] = {str(L): paired_bootstrap([d for length, d in pairs if length == L]) for L in lengths
                         if any(length == L for length, _ in pairs)}
            out[name]["all"] = paired_bootstrap([d for _, d in pairs])
    return out


def summarize(task: Task, records: Sequence[dict], config_names: Sequence[str], lengths: Sequence[int],
              info: dict) -> dict:
    """The summary dictionary written as ``summary.json``.

    ``records``: one run's, one per (config, sample) (``runner.select_records``); several records of a pair (of
    other runs in the same ``--out``) raise ``ValueError`` rather than being averaged or paired together.
    """
    pairs: dict[tuple, int] = {}
    for r in records:
        pairs[(r["config"], r["id"], r["fingerprint"])] = pairs.get((r["config"], r["id"], r["fingerprint"]), 0) + 1
    repeated = [pair for pair, n in pairs.items() if n > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} (config, sample) pair(s) have several records, e.g. {repeated[0]}: "
                         "summarize one run's records (runner.select_records)")
    groups = list(dict.fromkeys(r["group"] for r in records))
    scores: dict[str, dict] = {}
    average: dict[str, dict] = {}
    buckets: dict[str, dict] = {}
    budget: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for name in config_names:
        mine = [r for r in records if r["config"] == name]
        counts[name] = len(mine)
        scores[name] = {g: {str(L): _round(task.aggregate(cell)) for L in lengths
                            if (cell := [r for r in mine if r["group"] == g and r["length"] == L])}
                        for g in groups}
        average[name] = {}
        for L in list(lengths) + ["all"]:
            cell = [r for r in mine if L == "all" or r["length"] == L]
            if not cell:
                continue
            if task.higher_is_better and task.average_over_groups:   # mean over groups, each aggregated first
                per_group = [task.aggregate([r for r in cell if r["group"] == g]) for g in groups
                             if any(r["group"] == g for r in cell)]
                average[name][str(L)] = _round(_mean(per_group))
            else:
                average[name][str(L)] = _round(task.aggregate(cell))
        if any((r.get("meta") or {}).get("bucket") for r in mine):
            names = sorted({r["meta"]["bucket"] for r in mine if r["meta"].get("bucket")})
            buckets[name] = {b: _round(task.aggregate([r for r in mine if r["meta"].get("bucket") == b]))
                             for b in names}
        budget[name] = budget_summary(mine)
        budget[name]["per_length"] = {str(L): budget_summary([r for r in mine if r["length"] == L])
                                      for L in lengths if any(r["length"] == L for r in mine)}
    summary = {**info, "task": task.name, "score": task.score_name, "higher_is_better": task.higher_is_better,
               "configs": list(config_names), "lengths": list(lengths), "groups": groups,
               "num_records": counts, "scores": scores, "average": average, "budget": budget,
               "notes": list(task.notes)}
    if buckets:
        summary["length_buckets"] = buckets
        summary["length_buckets_title"] = task.buckets_title
    if task.higher_is_better and BASELINE in config_names:  # per-sample scores: paired with the baseline
        summary["vs_baseline"] = {"baseline": BASELINE, "confidence": 0.95, "resamples": BOOTSTRAP_RESAMPLES,
                                  "configs": paired_differences(records, config_names, lengths)}
    return summary


def _bucket_order(name: str) -> tuple:
    """Length buckets in their natural order: LongBench-E's by their lower bound, then short < medium < long."""
    words = {"short": 0, "medium": 1, "long": 2}
    digits = "".join(ch for ch in name.split("-")[0] if ch.isdigit())
    return (words.get(name, 3), int(digits) if digits else 0, name)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict) -> str:
    """Markdown tables: score per group x length x config, averages, then budgets."""
    configs, digits = summary["configs"], 2 if summary["task"] == "ppl" else 1
    lines = [f"## twilight eval {summary['task']}: {summary['score']}"
             + (" (lower is better)" if not summary["higher_is_better"] else ""), "",
             f"model `{summary.get('model')}`, "
             + (f"protocol `{summary['protocol']}`, " if summary.get("protocol") else "")
             + f"seed {summary.get('seed')}, "
             f"{summary.get('samples_per_cell')} sample(s) per cell, lengths in tokens", ""]
    lines += ["| group | length | " + " | ".join(configs) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in configs) + " |"]
    for group in summary["groups"]:
        for L in summary["lengths"]:
            row = [summary["scores"][c].get(group, {}).get(str(L)) for c in configs]
            if any(v is not None for v in row):
                lines.append(f"| {group} | {L} | " + " | ".join(_fmt(v, digits) for v in row) + " |")
    if len(summary["groups"]) > 1 or len(summary["lengths"]) > 1:
        for L in [*summary["lengths"], "all"]:
            row = [summary["average"][c].get(str(L)) for c in configs]
            if any(v is not None for v in row):
                lines.append(f"| **average** | {L} | " + " | ".join(f"**{_fmt(v, digits)}**" for v in row) + " |")
    if summary.get("length_buckets"):
        names = sorted({b for c in configs for b in summary["length_buckets"].get(c, {})}, key=_bucket_order)
        lines += ["", f"{summary.get('length_buckets_title', 'By length bucket')}:", "",
                  "| config | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
        for c in configs:
            lines.append(f"| {c} | " + " | ".join(_fmt(summary["length_buckets"].get(c, {}).get(b), digits)
                                                  for b in names) + " |")
    diffs = (summary.get("vs_baseline") or {}).get("configs") or {}
    if diffs:
        cols = [*map(str, summary["lengths"]), "all"]
        lines += ["", f"Difference from {summary['vs_baseline']['baseline']} on the same samples (percentage "
                  "points; mean of paired differences [95% paired bootstrap interval]):", "",
                  "| config | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
        for c, cells in diffs.items():
            lines.append(f"| {c} | " + " | ".join(
                f"{cells[L]['delta']:+.1f} [{cells[L]['low']:+.1f}, {cells[L]['high']:+.1f}]" if L in cells else "–"
                for L in cols) + " |")
    lines += ["", "Decode-step attention budget (mean per sample):", "",
              "| config | attended tokens | context tokens | attended fraction | decode steps (question) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for c in configs:
        b = summary["budget"][c]
        lines.append(f"| {c} | {_fmt(b.get('mean_attended_tokens'))} | {_fmt(b.get('mean_context_tokens'))} | "
                     f"{_fmt(b.get('attended_fraction'), 3)} | {_fmt(b.get('decode_steps'))} "
                     f"({_fmt(b.get('question_tokens'))}) |")
    for note in summary.get("notes", []):
        lines += ["", f"> {note}"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: str) -> list[str]:
    """``accuracy_vs_length.png`` and ``budget.png`` (plus ``budget_per_layer.png`` when recorded)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, lengths = summary["configs"], summary["lengths"]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in configs:
        xs = [L for L in lengths if summary["average"][c].get(str(L)) is not None]
        ax.plot(xs, [summary["average"][c][str(L)] for L in xs], marker="o", label=c)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(summary["score"])
    if summary["higher_is_better"]:   # percentages
        ax.set_ylim(-3, 103)
    ax.set_title(f"{summary['task']}: {summary['score']} vs context length")
    if len(lengths) > 1 and min(lengths) > 0 and max(lengths) / min(lengths) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "accuracy_vs_length.png")

    attended = [summary["budget"][c].get("mean_attended_tokens") for c in configs]
    context = [summary["budget"][c].get("mean_context_tokens") for c in configs]
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(configs) + 2), 4))
    xs = range(len(configs))
    ax.bar(xs, [v or 0 for v in context], color="#dddddd", label="context tokens")
    ax.bar(xs, [v or 0 for v in attended], color="#3b75af", label="attended tokens")
    for x, a, ctx in zip(xs, attended, context, strict=True):
        if a is not None and ctx:
            ax.annotate(f"{a:.0f} ({a / ctx:.0%})", (x, a), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), configs)
    ax.set_ylim(0, 1.15 * max([v or 0 for v in context + attended] + [1]))
    ax.set_ylabel("tokens per decode step (mean)")
    ax.set_title(f"{summary['task']}: attended budget per configuration")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    save(fig, "budget.png")

    per_layer = {c: summary["budget"][c].get("per_layer_attended_tokens") for c in configs}
    if any(per_layer.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c, values in per_layer.items():
            if values:
                ax.plot(range(len(values)), values, marker=".", label=c)
        ax.set_xlabel("layer")
        ax.set_ylabel("attended tokens per decode step (mean)")
        ax.set_title(f"{summary['task']}: budget per layer")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "budget_per_layer.png")
    return written


def write_reports(summary: dict, out_dir: str, plots: bool = True) -> dict[str, str]:
    """Write ``summary.json``, ``results.md`` and the plots; returns ``{kind: path}``."""
    paths = {"summary": os.path.join(out_dir, "summary.json"), "table": os.path.join(out_dir, "results.md")}
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(markdown(summary))
    if plots:
        for path in plot(summary, out_dir):
            paths[os.path.splitext(os.path.basename(path))[0]] = path
    return paths
