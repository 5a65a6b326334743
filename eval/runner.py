"""The loop shared by every harness: configs x samples, with resume and data parallelism.

For each configuration the model is patched once (``twilight.patch``), then every sample of
this process's shard is greedily decoded (or forced, for ppl), scored, and appended with its
decode-step budget statistics as one line of JSONL. A sample whose decode steps did not go
through Twilight (the patch was bypassed: they ran dense) stops the run with an ``EvalError``
before anything is written for it. A line is keyed by
``(sample id, config name, sample fingerprint)``: rerunning with the same ``--out`` skips
every key already on disk, so an interrupted run resumes where it stopped, and a sample
whose content changed (other seed, other tokenizer) is evaluated afresh.

Data parallelism: under ``accelerate launch`` (or any launcher that sets ``RANK`` /
``WORLD_SIZE``) process ``r`` of ``w`` takes samples ``r, r + w, ...`` and writes
``samples.rank<r>.jsonl``; after a barrier the main process merges the shards into
``samples.jsonl`` and writes the reports.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .common import EvalError, Sample
from .tasks.base import Task

RESULTS_FILE = "samples.jsonl"


# --------------------------------------------------------------------------- the library

class TwilightBackend:
    """What the runner needs from ``twilight``; tests may substitute a stand-in."""

    def load_config(self, spec: str):
        """``(display name, config)`` for a preset name or JSON path; ``EvalError`` if invalid.

        An evaluation measures what sparsity does to accuracy, so a config that leaves ``dense_below`` at
        ``"auto"`` (the speed crossover, which would decode short contexts densely) is evaluated sparse from the
        first decode step (``dense_below=0``), as the papers evaluate; a JSON config can set it explicitly.
        """
        import twilight
        try:
            cfg = twilight.TwilightConfig.load(spec)
        except (ValueError, OSError) as err:
            raise EvalError(f"--configs {spec}: {err}") from err
        if cfg.dense_below == "auto":
            cfg = cfg.replace(dense_below=0)
        return getattr(cfg, "name", None) or str(spec), cfg

    def patch(self, model, cfg) -> None:
        import twilight
        try:
            twilight.patch(model, cfg)
        except (ValueError, TypeError, NotImplementedError, ImportError, RuntimeError) as err:
            name = getattr(cfg, "name", cfg)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise EvalError(f"--configs {name}: cannot patch {type(model).__name__}: {first}") from err

    def unpatch(self, model) -> None:
        import twilight
        twilight.unpatch(model)

    def reset_stats(self, model) -> None:
        import twilight
        twilight.budget_stats(model).reset()

    def read_stats(self, model) -> dict | None:
        import twilight
        return jsonable(twilight.budget_stats(model).as_dict())

    def prefill(self, model, input_ids, configs=()):
        """``modeling.Prefill`` of ``input_ids`` under the config ``model`` is patched with, observed for every
        config of ``configs`` too (``modeling.prefill``)."""
        from .modeling import prefill
        return prefill(model, input_ids, configs)

    def prefill_blocker(self, model) -> str | None:
        """Why one prefill per sample would change this model's tokens (``modeling.prefill_sharing_blocker``)."""
        from .modeling import prefill_sharing_blocker
        return prefill_sharing_blocker(model)

    def fork(self, model, pre):
        """``pre`` with a copy of its cache for the config ``model`` is patched with now."""
        from twilight.integrations.hf import fork_cache

        from .modeling import Prefill
        return Prefill(pre.input_ids, fork_cache(model, pre.cache), pre.last_logits)

    def engagement(self, model) -> dict:
        """``twilight.integrations.hf.engagement``: decode forwards run, and those Twilight served."""
        from twilight.integrations.hf import engagement
        return engagement(model)


def check_engaged(name: str, sample_id: str, before: dict, after: dict) -> None:
    """``EvalError`` when a sample ran decode steps and none of them went through Twilight."""
    from twilight.integrations.hf import bypassed_steps

    bypassed = bypassed_steps(before, after)
    if bypassed is not None:
        decoded, cause = bypassed
        raise EvalError(f"--configs {name}: sample {sample_id} ran {decoded} decode step(s) and none went through "
                        f"Twilight ({cause}); refusing to score it as {name} (nothing was written for it)")


def jsonable(value: Any) -> Any:
    """Tensors, numpy values and nested containers turned into plain JSON types."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------- processes

@dataclass
class Dist:
    """This process's place among the data-parallel workers."""
    rank: int = 0
    world: int = 1
    state: Any = None      # accelerate.PartialState when launched with several processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        return str(self.state.device) if self.state is not None else None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def current_dist() -> Dist:
    """Rank and world size from ``accelerate`` (or the launcher's ``RANK``/``WORLD_SIZE``)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    try:
        import torch
        from accelerate import PartialState
    except ImportError as err:
        raise EvalError("WORLD_SIZE > 1 but `accelerate` is not installed; pip install accelerate") from err
    # Shards can take very different times: keep the final barrier from timing out.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    return Dist(state.process_index, state.num_processes, state)


def shard(samples: Sequence[Sample], dist: Dist) -> list[Sample]:
    return list(samples[dist.rank::dist.world])


# --------------------------------------------------------------------------- JSONL

def shard_path(out_dir: str, dist: Dist) -> str:
    name = RESULTS_FILE if dist.world == 1 else f"samples.rank{dist.rank}.jsonl"
    return os.path.join(out_dir, name)


def read_records(out_dir: str) -> list[dict]:
    """Every complete record in ``samples.jsonl`` and the per-rank shards.

    Files are read as bytes and each line decoded on its own: a line torn by an interruption (anywhere, even
    inside a multi-byte character) is skipped and its sample redone, and never stops the others from loading.
    """
    paths = [os.path.join(out_dir, RESULTS_FILE)] + sorted(glob.glob(os.path.join(out_dir, "samples.rank*.jsonl")))
    records = []
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue   # a line cut short by an interruption: that sample is redone
                if isinstance(record, dict):
                    records.append(record)
    return records


def record_key(record: dict) -> tuple[str, str, str]:
    return record["id"], record["config"], record["fingerprint"]


def failed(record: dict) -> bool:
    """A record of a sample whose evaluation raised: kept for the log, redone on resume, left out of reports."""
    return record.get("error") is not None


def append_record(path: str, record: dict) -> None:
    """Append one JSON line, first ending a line torn by an earlier interruption (bytes: a torn multi-byte
    character is no obstacle)."""
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()


def merge_shards(out_dir: str) -> list[dict]:
    """Fold the per-rank shards into ``samples.jsonl`` (one line per key: ``latest_records``)."""
    merged = latest_records(read_records(out_dir))
    target = os.path.join(out_dir, RESULTS_FILE)
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in merged.values():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    for path in glob.glob(os.path.join(out_dir, "samples.rank*.jsonl")):
        os.remove(path)
    return list(merged.values())


# --------------------------------------------------------------------------- the loop

def evaluate(task: Task, model, tokenizer, samples: Sequence[Sample], configs: Sequence[tuple[str, Any]],
             out_dir: str, backend: TwilightBackend | None = None, dist: Dist | None = None,
             progress: bool = True, share_prefill: bool = False) -> int:
    """Run every (config, sample) pair of this process's shard that is not on disk yet.

    Args:
        configs: ``(name, config)`` pairs, e.g. from :meth:`TwilightBackend.load_config`.
        out_dir: results directory; records are appended to this process's JSONL shard.
        share_prefill: run each sample's prompt once (observed for every config whose selector watches the
            prompt) and decode it under every config from a copy of that cache: the same tokens as running each
            config from scratch, and for many configs several times faster (``generates`` tasks).
    Returns:
        the number of pairs evaluated in this call.
    """
    from tqdm.auto import tqdm

    backend = backend or TwilightBackend()
    dist = dist or Dist()
    os.makedirs(out_dir, exist_ok=True)
    path = shard_path(out_dir, dist)
    done = {record_key(r) for r in read_records(out_dir) if not failed(r)}
    mine = shard(samples, dist)
    todo = [(name, cfg, [s for s in mine if (s.id, name, s.fingerprint) not in done]) for name, cfg in configs]
    total = len(mine) * len(configs)
    remaining = sum(len(pending) for _, _, pending in todo)
    bar = tqdm(total=total, initial=total - remaining, disable=not progress, position=dist.rank,
               desc=f"{task.name}" + (f" [rank {dist.rank}]" if dist.world > 1 else ""),
               unit="sample", dynamic_ncols=True, file=sys.stderr)
    evaluated, patched = 0, False

    def run_one(name: str, sample: Sample, pre=None) -> None:
        nonlocal evaluated
        bar.set_postfix_str(f"{name} {sample.id}", refresh=True)
        backend.reset_stats(model)
        before = backend.engagement(model)
        start = time.perf_counter()
        try:
            if pre is None:
                result = task.evaluate(model, tokenizer, sample)
            else:
                result = task.evaluate_prefilled(model, tokenizer, sample, backend.fork(model, pre))
        except (EvalError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001 -- one failing sample must not end a long run
            result = {"prediction": None, "score": None, "error": f"{type(err).__name__}: {err}"}
            tqdm.write(f"{task.name}: {name} {sample.id} failed ({result['error']}); recorded, the run goes on "
                       "(it is redone on resume)", file=sys.stderr)
        seconds = time.perf_counter() - start
        if "error" not in result:
            check_engaged(name, sample.id, before, backend.engagement(model))
        record = {
            "id": sample.id, "config": name, "fingerprint": sample.fingerprint,
            "task": sample.task, "group": sample.group, "length": sample.length,
            "input_tokens": sample.input_tokens, "protocol": sample.protocol,
            "question_tokens": sample.question_tokens, "max_new_tokens": sample.max_new_tokens,
            "metric": sample.metric, "answers": sample.answers, **result,
            "budget": backend.read_stats(model), "seconds": round(seconds, 3), "process": dist.rank,
            "meta": jsonable(sample.meta)}
        if pre is not None:
            record["prefill_seconds"] = round(pre.seconds, 3)  # shared by the configs decoded from it
        append_record(path, record)
        evaluated += 1
        bar.update(1)

    # Only a dense-prefill sample takes its first token from the prefill's logits (decode-question ones from
    # generate()), so only those are affected by a generation config acting on the first token.
    blocker = (backend.prefill_blocker(model) if share_prefill and task.generates
               and any(s.question_start is None for s in mine) else None)
    if blocker:  # exact results first: every config runs its own prefill, and the user is told why
        task.notes.append(f"{task.name}: each config prefills every prompt itself: the model's generation config "
                          f"sets {blocker}, which a shared prefill's first token would not apply")
        tqdm.write(task.notes[-1], file=sys.stderr)
    try:
        if share_prefill and task.generates and not blocker:
            for sample in mine:
                pending = [(name, cfg) for name, cfg, todo_samples in todo if sample in todo_samples]
                if not pending:
                    continue
                backend.patch(model, pending[0][1])
                patched = True
                bar.set_postfix_str(f"prefill {sample.id}", refresh=True)
                start = time.perf_counter()
                pre = backend.prefill(model, sample.prefill_ids, [cfg for _, cfg in pending])
                pre.seconds = time.perf_counter() - start
                for i, (name, cfg) in enumerate(pending):
                    if i:
                        backend.patch(model, cfg)
                    run_one(name, sample, pre)
        else:
            for name, cfg, pending in todo:
                if not pending:
                    continue
                backend.patch(model, cfg)
                patched = True
                for sample in pending:
                    run_one(name, sample)
    finally:
        bar.close()
        if patched:
            backend.unpatch(model)
    return evaluated


def latest_records(records: Iterable[dict]) -> dict[tuple, dict]:
    """The latest record of each key, except that a success is never replaced by a later failure."""
    latest: dict[tuple, dict] = {}
    for record in records:
        if not (failed(record) and record_key(record) in latest):
            latest[record_key(record)] = record
    return latest


def _run_keys(samples: Sequence[Sample], config_names: Sequence[str]) -> list[tuple[str, str, str]]:
    return [(s.id, name, s.fingerprint) for name in config_names for s in samples]  # config, then sample order


def failed_records(records: Iterable[dict], samples: Sequence[Sample], config_names: Sequence[str]) -> list[dict]:
    """This run's (sample, config) pairs whose latest record is a failure."""
    latest = latest_records(records)
    return [latest[k] for k in _run_keys(samples, config_names) if k in latest and failed(latest[k])]


def select_records(records: Iterable[dict], samples: Sequence[Sample], config_names: Sequence[str]) -> list[dict]:
    """The records of exactly this run's samples and configs (older runs in the same --out are ignored)."""
    latest = latest_records(records)
    return [latest[k] for k in _run_keys(samples, config_names) if k in latest and not failed(latest[k])]
