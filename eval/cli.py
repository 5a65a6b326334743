"""``twilight eval {passkey,ruler,longbench,longbench-v2,ppl}``: the argument parser and the run.

Also runnable as ``python -m twilight_eval <task> ...`` (handy under
``accelerate launch -m twilight_eval ...``). Bad input exits with status 2 and a one-line
``error:`` message naming the parameter and what is allowed; the configs and ``--out`` are checked, and
``--out`` locked against a concurrent run (``outdir``), before the model loads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

from twilight.config import PRESETS

from . import metrics, outdir
from .common import EvalError, PromptEncoder, positive_int
from .tasks import TASKS, Task

PRESET_NAMES = tuple(PRESETS)
BASELINE = "dense"
DECODE_QUESTION, DENSE_PREFILL = "decode-question", "dense-prefill"
PROTOCOLS = (DECODE_QUESTION, DENSE_PREFILL)


def add_common_arguments(parser: argparse.ArgumentParser, task: type[Task]) -> None:
    from .modeling import default_model_id

    lengths = " ".join(map(str, task.default_lengths)) or "the model's maximum context"
    parser.add_argument("--model", default=default_model_id(),
                        help="Hugging Face id, local directory or .gguf file (default: %(default)s, "
                             "embedded and loaded offline)")
    parser.add_argument("--configs", nargs="+", default=["quest-twilight"], metavar="CONFIG",
                        help=f"Twilight presets ({', '.join(PRESET_NAMES)}) or JSON config files; "
                             f"'{BASELINE}' is added first as the baseline (default: quest-twilight)")
    parser.add_argument("--no-baseline", action="store_true", help=f"do not add '{BASELINE}' to --configs")
    parser.add_argument("--lengths", nargs="+", type=positive_int, metavar="TOKENS",
                        help=f"context lengths in the model's tokens, generation included (default: {lengths})")
    parser.add_argument("--samples", type=positive_int, metavar="N",
                        help="samples per cell: per task x length (x depth for passkey); for longbench, "
                             f"rows per dataset; for longbench-v2, rows (default: {task.default_samples or 'all'})")
    if task.generates:
        parser.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                            help="cap on generated tokens per sample (default: the benchmark's own budget, "
                                 "e.g. 128 for RULER's NIAH); shorter is much faster on a CPU")
        parser.add_argument("--protocol", default=DECODE_QUESTION, choices=PROTOCOLS,
                            help=f"'{DECODE_QUESTION}' (default, as Quest and Twilight evaluated LongBench and "
                                 "RULER): prefill the context, then run the question (the prompt after the context) "
                                 "through decode steps one token at a time, so sparse attention reads it too; "
                                 "'dense-prefill': prefill the whole prompt, only the answer is decoded sparsely")
        parser.add_argument("--no-share-prefill", dest="share_prefill", action="store_false",
                            help="run every prompt once per config (default: once per sample, then each config "
                                 "decodes from a copy of its cache: the same tokens, much faster)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sample generation (default: 0)")
    parser.add_argument("--out", metavar="DIR",
                        help=f"results directory; rerunning the same run (model, weights, configs' settings, dtype, "
                             f"device, backend, protocol, twilight version) with the same one resumes; one run at a "
                             f"time (default: results/{task.name})")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--chat", default="auto", choices=("auto", "on", "off"),
                        help="wrap prompts in the model's chat template (default: auto, if it has one)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_task_parsers(subparsers) -> None:
    for name, task in TASKS.items():
        module_doc = sys.modules[task.__module__].__doc__ or ""
        parser = subparsers.add_parser(name, help=task.help, description=module_doc.strip().split("\n\n")[0],
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(parser, task)
        task.add_arguments(parser)
        parser.set_defaults(func=run, task_cls=task, prog=parser.prog)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``twilight`` command's sub-parsers (see ``twilight/cli.py``)."""
    parser = subparsers.add_parser("eval", help="accuracy evaluations against dense attention: "
                                                + ", ".join(TASKS),
                                   description="Evaluate Twilight configurations against dense attention "
                                               "on the same samples.")
    add_task_parsers(parser.add_subparsers(dest="task", metavar="TASK", required=True))
    return parser


def build_parser(prog: str = "python -m twilight_eval") -> argparse.ArgumentParser:
    """A standalone parser: ``<prog> <task> [options]``."""
    parser = argparse.ArgumentParser(prog=prog, description="Twilight evaluations (same as `twilight eval`).")
    add_task_parsers(parser.add_subparsers(dest="task", metavar="TASK", required=True))
    return parser


def main(argv: Sequence[str] | None = None, collect: list | None = None) -> int:
    """``<task> [options]``; ``collect``: a list extended with the records this run reported (main process)."""
    args = build_parser().parse_args(argv)
    return args.func(args, collect=collect)


# --------------------------------------------------------------------------- the run

class _PeerFailed(Exception):
    """The main process refused the run (it printed why); the other processes exit quietly."""


def run(args: argparse.Namespace, collect: list | None = None) -> int:
    """Entry point of ``twilight eval <task>``; user errors exit 2 with one line on stderr.

    ``collect``: a list extended with the records the run reported (those of ``runner.select_records``).
    """
    try:
        records = _run(args)
    except EvalError as err:
        print(f"{args.prog}: error: {err}", file=sys.stderr)
        return 2
    except _PeerFailed:
        return 2
    except KeyboardInterrupt:
        print(f"\n{args.prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if collect is not None:
        collect.extend(records)
    return 0


def _config_specs(args: argparse.Namespace) -> list[str]:
    specs = list(dict.fromkeys(args.configs))
    if not args.no_baseline and BASELINE not in specs:
        specs.insert(0, BASELINE)
    return specs


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _take_out_dir(out_dir: str, dist) -> outdir.OutLock | None:
    """Check ``--out`` and lock it (main process), before the model loads; every process learns the outcome."""
    from . import report, runner

    lock, failure = None, None
    if dist.is_main:
        try:
            outdir.prepare_out_dir(out_dir, (runner.RESULTS_FILE, *report.OUTPUT_FILES))
            lock = outdir.OutLock(out_dir)
            note = lock.acquire()
            if note:
                _log(note)
        except EvalError as err:
            failure = str(err)
    failure = dist.broadcast(failure)
    if failure is not None:
        if dist.is_main:
            raise EvalError(failure)
        raise _PeerFailed
    return lock


def _run(args: argparse.Namespace) -> list[dict]:
    """The run; returns the records it reported (none in the processes other than the main one)."""
    from . import runner

    started = time.time()
    task: Task = args.task_cls(args)
    task.check_arguments()

    # Configurations first: a typo should not cost a model load.
    backend = runner.TwilightBackend()
    configs = [backend.load_config(spec) for spec in _config_specs(args)]
    names = [name for name, _ in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise EvalError(f"--configs: several configurations are named {', '.join(duplicated)}; "
                        f"rename the JSON files")

    missing = metrics.missing_dependencies(task.metric_names())
    if missing:  # before the model loads, not after the first sample was generated
        raise EvalError(f"{task.name}'s metrics need {', '.join(missing)}: pip install {' '.join(missing)} "
                        "(or pip install 'twilight[eval]')")

    dist = runner.current_dist()
    out_dir = args.out or os.path.join("results", task.name)
    lock = _take_out_dir(out_dir, dist)   # a bad --out, or another run writing there, costs no model load
    try:
        return _run_locked(args, task, backend, configs, dist, out_dir, started)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(args: argparse.Namespace, task: Task, backend, configs, dist, out_dir: str,
                started: float) -> list[dict]:
    from . import report, runner
    from .modeling import load_model, max_context, resolve_device

    names = [name for name, _ in configs]
    device = dist.device if dist.world > 1 and args.device == "auto" else resolve_device(args.device)
    model, tokenizer = load_model(args.model, args.dtype, device)
    limit = max_context(model)
    lengths = sorted(set(args.lengths or task.default_lengths or ([limit] if limit else [])))
    if not lengths:
        raise EvalError("--lengths: required, the model does not state its maximum context")
    too_long = [L for L in lengths if limit and L > limit]
    if too_long:
        raise EvalError(f"--lengths {' '.join(map(str, too_long))}: longer than the maximum context of "
                        f"{args.model} ({limit} tokens, max_position_embeddings)")

    encoder = PromptEncoder(tokenizer, args.chat)
    samples = task.build_samples(tokenizer, encoder, lengths, args.samples, args.seed)
    if getattr(args, "max_new_tokens", None):
        for sample in samples:
            sample.max_new_tokens = min(sample.max_new_tokens, args.max_new_tokens)
    protocol = apply_protocol(task, samples, getattr(args, "protocol", None))
    if dist.is_main:
        for note in task.notes:
            _log(note)
        _log(f"{task.name}: {len(samples)} samples x {len(configs)} configs ({', '.join(names)}) "
             f"on {args.model}, lengths {' '.join(map(str, lengths))}"
             + (f", {dist.world} processes" if dist.world > 1 else ""))

    runs = runner.resume_keys(configs, runner.run_context(args.model, model, protocol), backend)
    if dist.is_main and args.overwrite:
        for path in os.listdir(out_dir):
            if path.startswith("samples") and path.endswith(".jsonl"):
                os.remove(os.path.join(out_dir, path))
    dist.barrier()

    runner.evaluate(task, model, tokenizer, samples, configs, out_dir, backend=backend, dist=dist,
                    progress=not args.no_progress, share_prefill=getattr(args, "share_prefill", False), runs=runs)
    dist.barrier()
    if not dist.is_main:
        return []

    records = runner.merge_shards(out_dir) if dist.world > 1 else runner.read_records(out_dir)
    errors = runner.failed_records(records, samples, runs)
    if errors:
        task.notes.append(f"{len(errors)} sample(s) failed and are left out of the tables (their 'error' is in "
                          f"{runner.RESULTS_FILE}; rerun the command to retry them), e.g. {errors[0]['config']} "
                          f"{errors[0]['id']}: {errors[0]['error']}")
        _log(task.notes[-1])
    records = runner.select_records(records, samples, runs)
    info = {"model": args.model, "protocol": protocol, "seed": args.seed,
            "samples_per_cell": args.samples or task.default_samples or "all", "device": str(device),
            "dtype": args.dtype, "chat_template": encoder.chat, "processes": dist.world,
            "python": platform.python_version(), "command": " ".join(sys.argv),
            "seconds": round(time.time() - started, 1),
            "runs": {name: {"run_key": runner.run_key(run), **run} for name, run in runs.items()},
            "config_settings": {name: backend.config_identity(cfg, runs[name]["device"])["settings"]
                                for name, cfg in configs},
            "options": {k: v for k, v in vars(args).items()
                        if k not in ("func", "task_cls", "prog") and _is_json(v)}}
    summary = report.summarize(task, records, names, lengths, info)
    paths = report.write_reports(summary, out_dir, plots=not args.no_plots)
    print(report.markdown(summary))
    _log(f"results: {os.path.join(out_dir, runner.RESULTS_FILE)}, "
         + ", ".join(paths.values()) + f" ({time.time() - started:.0f} s)")
    return records


def apply_protocol(task: Task, samples, protocol: str | None) -> str | None:
    """Set every sample up for ``--protocol`` and return what the summary records.

    ``dense-prefill`` clears each sample's ``question_start``; under ``decode-question`` a sample without a
    context/question split (``question_start`` is ``None``) is prefilled whole, and a note says how many.
    ``None`` for tasks that do not generate (ppl: every scored token is a decode step anyway).
    """
    if protocol is None:
        return None
    if protocol == DENSE_PREFILL:
        for sample in samples:
            sample.question_start = None
        return protocol
    whole = [s for s in samples if s.question_start is None]
    if whole:
        task.notes.append(f"--protocol {DECODE_QUESTION}: {len(whole)} of {len(samples)} sample(s) have no "
                          f"context/question split and are prefilled whole (e.g. {whole[0].id}); their records say "
                          f"protocol {DENSE_PREFILL!r}")
    return protocol


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
