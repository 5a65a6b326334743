"""The loop shared by every harness: configs x samples, with resume and data parallelism.

For each configuration the model is patched once (``twilight.patch``), then every sample of
this process's shard is greedily decoded (or forced, for ppl), scored, and appended with its
decode-step budget statistics as one line of JSONL. A sample whose decode steps did not go
through Twilight (the patch was bypassed: they ran dense) stops the run with an ``EvalError``
before anything is written for it. A line is keyed by
``(sample id, config name, sample fingerprint, run key)``: rerunning with the same ``--out`` skips
every key already on disk, so an interrupted run resumes where it stopped, and anything that
changes a result is evaluated afresh: a sample whose content changed (other seed, other
tokenizer, other protocol) has another fingerprint, and the run key (``run_key``) hashes the
record's ``run``: the model (``--model`` and a fingerprint of its weights and architecture), the
dtype, the device type, the protocol, twilight's version, and per config its settings (canonical
JSON, not its name) and the backend it resolves to (``resume_keys``). Records of another run (or
from before run keys) stay in the file, are said to be set aside, and are never reported as this
run's (``select_records``).

Data parallelism: under ``accelerate launch`` (or any launcher that sets ``RANK`` /
``WORLD_SIZE``) process ``r`` of ``w`` takes samples ``r, r + w, ...`` and writes
``samples.rank<r>.jsonl``; after a barrier the main process merges the shards into
``samples.jsonl`` and writes the reports.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
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

    def config_identity(self, cfg, device: str) -> dict:
        """What of ``cfg`` a result depends on: ``{"config": hash of its settings, "backend": the backend it
        resolves to on ``device``, "settings": the settings}``.

        The settings are ``TwilightConfig.canonical_json`` (every field but the name) plus the content of the
        channel file a ``double_sparse`` selector reads; a stand-in config (tests) is hashed as JSON.
        """
        canonical = getattr(cfg, "canonical_json", None)
        if canonical is None:
            settings = json.dumps(jsonable(cfg), sort_keys=True)
            return {"config": _digest(settings.encode()), "backend": None, "settings": jsonable(cfg)}
        settings = canonical()
        digest = hashlib.sha256(settings.encode())
        path = getattr(getattr(cfg, "selector", None), "channels_path", None)
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(f.read())
        try:
            from twilight.backends import resolve_backend
            backend = resolve_backend(cfg.backend, device).name
        except Exception:  # noqa: BLE001 -- an unavailable backend fails when the config is patched
            backend = cfg.backend
        return {"config": digest.hexdigest()[:16], "backend": backend, "settings": json.loads(settings)}


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


# --------------------------------------------------------------------------- what a result depends on

#: The fields of a record's ``run``, as the set-aside line names them.
RUN_FIELDS = {"model": "--model", "weights": "model weights", "dtype": "dtype", "device": "device",
              "protocol": "protocol", "twilight": "twilight version", "config": "config settings",
              "backend": "backend"}
_UNSTABLE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype", "name_or_path")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _architecture(value: Any) -> Any:
    """A model config's dict without what does not change its outputs: paths, versions, dtype, private keys
    (``_attn_implementation``, which patching switches)."""
    if isinstance(value, dict):
        return {k: _architecture(v) for k, v in value.items()
                if not str(k).startswith("_") and k not in _UNSTABLE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_architecture(v) for v in value]
    return value


def weights_fingerprint(model, values_per_tensor: int = 1024) -> str:
    """A hash of the model's architecture and weights, cheap at any size.

    Hashes the model config (``_architecture``) and, for every parameter, its name, shape, dtype and
    ``values_per_tensor`` evenly spaced values (all of a smaller tensor): a few MB read even for a large
    model, yet other weights (another checkpoint, another fine-tune, another random init) give another hash.
    """
    import torch

    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "to_dict"):
        h.update(json.dumps(_architecture(cfg.to_dict()), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            if param.is_meta:
                continue
            flat = param.detach().reshape(-1)
            n = flat.numel()
            if n > values_per_tensor:
                idx = torch.arange(values_per_tensor, device=flat.device) * (n - 1) // (values_per_tensor - 1)
                flat = flat.index_select(0, idx)
            h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(spec: str) -> str:
    """``--model`` as recorded: a local path made absolute (the same directory from any working directory), a
    hub id as given."""
    return os.path.realpath(spec) if os.path.exists(spec) else spec


def twilight_version() -> str | None:
    try:
        import twilight
    except ImportError:
        return None
    return getattr(twilight, "__version__", None)


def run_context(model_spec: str, model, protocol: str | None) -> dict:
    """The part of every record's ``run`` that does not depend on the config: ``model`` (``model_identity``),
    ``weights`` (``weights_fingerprint``), ``dtype`` and ``device`` (type) of the loaded model's parameters,
    ``protocol`` and ``twilight`` (the library's version)."""
    param = next(model.parameters())
    dtype = getattr(model, "dtype", None) or param.dtype
    return {"model": model_identity(model_spec), "weights": weights_fingerprint(model),
            "dtype": str(dtype).removeprefix("torch."), "device": param.device.type, "protocol": protocol,
            "twilight": twilight_version()}


def resume_keys(configs: Sequence[tuple[str, Any]], context: Mapping | None = None,
                backend: TwilightBackend | None = None) -> dict[str, dict]:
    """``{config name: the run its records carry}``: ``context`` (``run_context``; twilight's version at least)
    plus the config's ``config`` (settings hash) and ``backend`` (``TwilightBackend.config_identity``)."""
    backend = backend or TwilightBackend()
    context = {"twilight": twilight_version(), **(context or {})}
    device = context.get("device") or "cpu"
    runs = {}
    for name, cfg in configs:
        identity = backend.config_identity(cfg, device)
        runs[name] = {**context, "config": identity["config"], "backend": identity["backend"]}
    return runs


def run_key(run: Mapping | None) -> str | None:
    """The hash of a record's ``run`` (``None`` for records written before runs were recorded)."""
    if not isinstance(run, Mapping):
        return None
    return _digest(json.dumps(run, sort_keys=True, separators=(",", ":"), default=str).encode())


def _keys_of(runs: Mapping[str, Any]) -> dict[str, str | None]:
    """Config name -> run key, from ``resume_keys``' runs (or keys already)."""
    return {name: run if isinstance(run, str) or run is None else run_key(run) for name, run in runs.items()}


def set_aside_line(aside: Sequence[dict], runs: Mapping[str, dict], out_dir: str) -> str:
    """The one line saying how many of this run's (sample, config) records came from another run, and why."""
    fields: list[str] = []
    unkeyed = 0
    for record in aside:
        old = record.get("run")
        if not isinstance(old, Mapping) or record.get("run_key") is None:
            unkeyed += 1
            continue
        new = runs.get(record["config"], {})
        for k in [*RUN_FIELDS, *sorted((set(old) | set(new)) - set(RUN_FIELDS))]:
            label = RUN_FIELDS.get(k, k)
            if old.get(k) != new.get(k) and label not in fields:
                fields.append(label)
    why = []
    if len(aside) > unkeyed:
        why.append("other " + ", ".join(fields) if fields else "another run key")
    if unkeyed:
        why.append(f"{unkeyed} written before records carried a run key")
    return (f"set aside {len(aside)} record(s) in {os.path.join(out_dir, RESULTS_FILE)} that another run wrote for "
            f"this run's samples and configs ({'; '.join(why)}): they stay in the file, are not this run's "
            "results, and are recomputed")


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

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, in every process (a picklable object)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]


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


def record_key(record: dict) -> tuple[str, str, str, str | None]:
    """``(sample id, config name, sample fingerprint, run key)``; the run key is ``None`` in records written
    before runs were recorded, which therefore match no run."""
    return record["id"], record["config"], record["fingerprint"], record.get("run_key")


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
    """Fold the per-rank shards into ``samples.jsonl`` (one line per key: ``latest_records``; records of other
    runs keep their own lines)."""
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
             progress: bool = True, share_prefill: bool = False, runs: Mapping[str, dict] | None = None) -> int:
    """Run every (config, sample) pair of this process's shard that is not on disk yet under this run's key.

    Args:
        configs: ``(name, config)`` pairs, e.g. from :meth:`TwilightBackend.load_config`.
        out_dir: results directory; records are appended to this process's JSONL shard. Nothing here locks
            it: ``twilight eval`` holds ``outdir.OutLock`` around the call.
        share_prefill: run each sample's prompt once (observed for every config whose selector watches the
            prompt) and decode it under every config from a copy of that cache: the same tokens as running each
            config from scratch, and for many configs several times faster (``generates`` tasks).
        runs: ``{config name: run}`` from :func:`resume_keys` (the CLI passes the model, dtype, device and
            protocol in its context); default: ``resume_keys(configs)``, the configs' settings and twilight's
            version only. A record of the same sample and config under another run is set aside (one line on
            stderr says how many) and the pair is evaluated again.
    Returns:
        the number of pairs evaluated in this call.
    """
    from tqdm.auto import tqdm

    backend = backend or TwilightBackend()
    dist = dist or Dist()
    runs = dict(runs) if runs is not None else resume_keys(configs, None, backend)
    keys = _keys_of(runs)
    os.makedirs(out_dir, exist_ok=True)
    path = shard_path(out_dir, dist)
    finished = [r for r in read_records(out_dir) if not failed(r)]
    done = {record_key(r) for r in finished}
    mine = shard(samples, dist)
    todo = [(name, cfg, [s for s in mine if (s.id, name, s.fingerprint, keys[name]) not in done])
            for name, cfg in configs]
    redo = {(s.id, name, s.fingerprint) for name, _, pending in todo for s in pending}
    aside = [r for r in finished if (r["id"], r["config"], r["fingerprint"]) in redo]
    if aside:
        tqdm.write(f"{task.name}" + (f" [rank {dist.rank}]" if dist.world > 1 else "") + ": "
                   + set_aside_line(aside, runs, out_dir), file=sys.stderr)
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
            "id": sample.id, "config": name, "fingerprint": sample.fingerprint, "run_key": keys[name],
            "run": runs[name],
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


def _run_keys(samples: Sequence[Sample], runs: Mapping[str, Any]) -> list[tuple[str, str, str, str | None]]:
    keys = _keys_of(runs)
    return [(s.id, name, s.fingerprint, key) for name, key in keys.items() for s in samples]  # config, then sample


def failed_records(records: Iterable[dict], samples: Sequence[Sample], runs: Mapping[str, Any]) -> list[dict]:
    """This run's (sample, config) pairs whose latest record under this run's key is a failure.

    ``runs``: ``{config name: run}`` from :func:`resume_keys` (or ``{name: run key}``), in the report's order.
    """
    latest = latest_records(records)
    return [latest[k] for k in _run_keys(samples, runs) if k in latest and failed(latest[k])]


def select_records(records: Iterable[dict], samples: Sequence[Sample], runs: Mapping[str, Any]) -> list[dict]:
    """The records of exactly this run: its samples (id and fingerprint), its configs, under its run keys
    (``runs`` as for :func:`failed_records`). Records of other runs in the same ``--out`` (another model,
    dtype, config content, ..., or written before run keys) are left out."""
    latest = latest_records(records)
    return [latest[k] for k in _run_keys(samples, runs) if k in latest and not failed(latest[k])]
