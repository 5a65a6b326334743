"""Does top-p improve Quest at the same number of attended tokens? The paper's claim, checked on one model.

The top-p arm is a run that already exists: ``scripts/ruler_table.sh`` evaluates ``quest-twilight-1024-head``
(Quest's 1024 candidates per query head, then the int4 estimate and top-p 0.85). Top-p keeps far fewer tokens
than the 1024 candidates, so comparing it with Quest-1024 compares a small budget with a large one. This
command runs Quest alone at the budget the top-p arm actually attended: its mean attended tokens per query head
(over the sparse layers' decode steps), rounded up to whole Quest pages, on the same samples (the same seed,
tasks and lengths give the same prompts; records pair by sample id and fingerprint). It then writes the paired
difference, top-p arm minus Quest arm, with a 95% paired bootstrap interval. Quest's most recent page is always
kept and is partial, so Quest attends about half a page less than its budget: the table reports both arms'
measured attended tokens, and a second run with ``--budget`` one page higher brackets the match from above::

    python -m twilight_eval.matched_budget --reference benchmarks/results/ruler-smollm2-gqa \\
        --out benchmarks/results/ruler-smollm2-matched

Outputs in ``--out``: the eval run (``samples.jsonl``, ``summary.json``), ``configs/`` and ``matched.md`` /
``matched.json`` (the table). Reruns resume.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence

from .report import paired_bootstrap
from .selector_table import selector_config

REFERENCE_CONFIG = "quest-twilight-1024-head"
TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "fwe")


def _scored(records: Iterable[dict], config: str, lengths: Sequence[int]) -> dict[tuple[str, str], dict]:
    """The latest successful record of ``config`` per (sample id, fingerprint) at ``lengths``."""
    out = {}
    for r in records:
        if r.get("config") == config and r.get("error") is None and r.get("length") in lengths:
            out[(r["id"], r["fingerprint"])] = r
    return out


def matched_budget(mean_attended: float, page_size: int) -> int:
    """The Quest budget that attends at least ``mean_attended`` tokens: whole pages, as Quest selects them.

    >>> matched_budget(28.5, 16)
    32
    """
    if not mean_attended > 0:
        raise ValueError(f"mean_attended must be > 0, got {mean_attended}")
    return page_size * math.ceil(mean_attended / page_size)


def mean_attended(records: Iterable[dict]) -> float:
    """Mean over records of their mean attended tokens per query head and decode step (sparse layers)."""
    values = [r["budget"]["mean_attended_tokens"] for r in records if (r.get("budget") or {}).get(
        "mean_attended_tokens") is not None]
    if not values:
        raise ValueError("no record holds budget.mean_attended_tokens")
    return sum(values) / len(values)


def compare(reference: dict[tuple[str, str], dict], candidate: dict[tuple[str, str], dict],
            lengths: Sequence[int]) -> dict:
    """Per length and over all: both arms' scores and attended tokens on the samples both hold, and the paired
    difference reference minus candidate (percentage points) with its bootstrap interval."""
    out: dict = {}
    for L in [*lengths, "all"]:
        keys = sorted(k for k in reference.keys() & candidate.keys()
                      if L == "all" or reference[k]["length"] == L)
        if not keys:
            continue
        ref, cand = [reference[k] for k in keys], [candidate[k] for k in keys]
        out[str(L)] = {
            "samples": len(keys),
            "reference_score": 100.0 * sum(r["score"] for r in ref) / len(ref),
            "candidate_score": 100.0 * sum(r["score"] for r in cand) / len(cand),
            "reference_attended": mean_attended(ref), "candidate_attended": mean_attended(cand),
            "difference": paired_bootstrap([100.0 * (a["score"] - b["score"]) for a, b in zip(ref, cand, strict=True)]),
        }
    return out


def render_markdown(table: dict, reference: str, candidate: str) -> str:
    lines = ["| length | samples | " + f"{reference}: score | attended/head | {candidate}: score | attended/head | "
             "difference [95% CI] |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for L, row in table.items():
        d = row["difference"]
        lines.append(f"| {L} | {row['samples']} | {row['reference_score']:.1f} | {row['reference_attended']:.1f} | "
                     f"{row['candidate_score']:.1f} | {row['candidate_attended']:.1f} | "
                     f"{d['delta']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] |")
    return "\n".join(lines) + "\n"


def _read(path: str) -> list[dict]:
    from .runner import read_records

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--reference {path!r} is not a results directory (run scripts/ruler_table.sh)")
    return read_records(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twilight_eval.matched_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", default=os.path.join("benchmarks", "results", "ruler-smollm2-gqa"),
                   help="results directory holding the top-p arm (scripts/ruler_table.sh's --out)")
    p.add_argument("--reference-config", default=REFERENCE_CONFIG, help="the top-p arm's config name there")
    p.add_argument("--gqa", default="head", choices=("group", "head"), help="the Quest arm's selector.gqa "
                   "(match the reference config's)")
    p.add_argument("--budget", type=int, default=None, help="Quest's token budget (default: the reference's mean "
                   "attended tokens per query head, rounded up to whole pages)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "ruler-smollm2-matched"))
    p.add_argument("--lengths", nargs="+", type=int, default=[8192])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--max-new-tokens", type=int, default=None, help="as the reference run's (default: RULER's own)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from twilight import TwilightConfig

    from . import cli
    from .modeling import default_model_id

    args = build_parser().parse_args(argv)
    if args.budget is not None and args.budget < 1:
        print(f"error: --budget must be >= 1, got {args.budget}", file=sys.stderr)
        return 2
    if args.page_size < 1:
        print(f"error: --page-size must be >= 1, got {args.page_size}", file=sys.stderr)
        return 2
    reference = _scored(_read(args.reference), args.reference_config, args.lengths)
    if not reference:
        print(f"error: {args.reference} holds no {args.reference_config} record at lengths {args.lengths}",
              file=sys.stderr)
        return 2
    budget = args.budget or matched_budget(mean_attended(reference.values()), args.page_size)
    cfg = selector_config("quest", budget, None)
    name = f"quest-{budget}" + ("-head" if args.gqa == "head" else "")
    cfg = {**cfg, "selector": {**cfg["selector"], "gqa": args.gqa, "page_size": args.page_size}, "name": name}
    TwilightConfig.load(cfg)  # validate before anything runs
    os.makedirs(os.path.join(args.out, "configs"), exist_ok=True)
    path = os.path.join(args.out, "configs", name + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    reported: list[dict] = []
    argv_run = ["ruler", "--model", args.model or default_model_id(), "--configs", path, "--no-baseline",
                "--lengths", *map(str, args.lengths), "--samples", str(args.samples), "--tasks", *args.tasks,
                "--out", args.out, "--no-plots"] + (["--no-progress"] if args.no_progress else []) \
        + (["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else [])
    rc = cli.main(argv_run, collect=reported)
    if rc:
        return rc
    candidate = _scored(reported, name, args.lengths)
    missing = len(candidate.keys() - reference.keys())
    if missing:
        print(f"error: {missing} of {len(candidate)} samples have no {args.reference_config} record in "
              f"{args.reference}: finish that run first (same seed, tasks and lengths)", file=sys.stderr)
        return 1
    table = compare(reference, candidate, args.lengths)
    data = {"reference": {"dir": args.reference, "config": args.reference_config}, "candidate": cfg,
            "budget": budget, "lengths": args.lengths, "tasks": args.tasks, "samples": args.samples,
            "table": table}
    with open(os.path.join(args.out, "matched.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    text = render_markdown(table, args.reference_config, name)
    with open(os.path.join(args.out, "matched.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
