"""Twilight evaluation harnesses, installed as the package ``twilight_eval``.

Reached through the console command ``twilight eval {passkey,ruler,longbench,longbench-v2,ppl}``
(see ``eval/README.md``). Every harness compares several Twilight configurations
against dense attention on the same, deterministically generated samples, writes
per-sample JSONL, a summary JSON, a Markdown table and PNG plots, and resumes an
interrupted run without redoing finished samples (another run's records are recomputed, never reported).

Layout:

- ``common``   -- the :class:`Sample` record, prompt encoding, token-exact length fitting.
- ``metrics``  -- RULER's metrics and LongBench's (with its own scoring libraries).
- ``tasks/``   -- passkey, RULER (synthetic, generated locally), LongBench and LongBench v2.
- ``ppl``      -- perplexity where every scored token comes out of a decode step.
- ``modeling`` -- model loading, greedy decoding, the decode-question protocol, one prefill per sample.
- ``runner``   -- the shared loop: configs x samples, resume (keyed on the run: model, weights, settings...),
  sharding.
- ``outdir``   -- ``--out`` checked before the model loads, and its lock file (one run at a time).
- ``report``   -- summary JSON, Markdown tables and plots.
- ``cli``      -- the ``twilight eval`` argument parser.
"""

__all__ = ["EvalError", "Sample", "TASKS"]

from .common import EvalError, Sample  # noqa: E402
from .tasks import TASKS  # noqa: E402
