"""lm-evaluation-harness bridge: ``--model twilight`` evaluates a Twilight-patched model on any lm-eval task.

::

    python -m twilight.integrations.lm_eval --model twilight \\
        --model_args twilight_config=quest-twilight --tasks hellaswag --limit 20

``python -m twilight.integrations.lm_eval ARGS`` is lm-eval's own command line (``lm_eval ARGS``: every option,
subcommand and output is lm-eval's) with the model type ``twilight`` registered first. lm-eval (checked up to
0.4.13) discovers models only in its own source tree (``lm_eval/models/__init__.py``): no entry points, no
plugin hook, so the plain ``lm_eval`` command cannot know ``twilight``. From Python, importing this module
registers it::

    import lm_eval
    import twilight.integrations.lm_eval  # noqa: F401  -- registers --model twilight
    lm_eval.simple_evaluate(model="twilight", model_args={"twilight_config": "quest-twilight"}, tasks=[...])

``TwilightLM`` is lm-eval's ``HFLM`` with the model patched by ``twilight.patch``. ``model_args``: all of
HFLM's, plus

- ``twilight_config``: preset name (``dense``, ``quest``, ``twilight``, ``quest-twilight``, ``streaming``), JSON
  config path, dict or ``TwilightConfig`` (default ``quest-twilight``). ``dense_below="auto"`` (the speed
  crossover, which would decode short contexts densely) becomes ``0``, as ``twilight eval`` does: an evaluation
  measures what sparsity does to accuracy. A JSON config may set it explicitly.
- ``pretrained``: as HFLM's; by default the embedded SmolLM2-135M-Instruct (``twilight.DEFAULT_MODEL_ID``, loaded
  offline by ``twilight.load_default_model``; ``dtype``/``device`` apply to it).

How each request type meets Twilight (which only sparsifies decode steps, single-token queries over the cache;
a multi-token forward runs dense):

- ``generate_until``: HFLM's batched ``model.generate`` (left padding); each call is checked afterwards, and a
  call whose decode steps did not all go through Twilight raises ``TwilightNotEngagedError``.
- ``loglikelihood`` (multiple choice, ...) and ``loglikelihood_rolling`` (perplexity): a plain HFLM scores a
  continuation with one teacher-forced forward, which would run entirely dense. Here the context minus its last
  token is prefilled, then the context's last token and every continuation token but the last go through a
  decode step of their own (one single-token forward with the cache); the log-probability of continuation token
  ``i`` comes from the decode step that precedes it, so every scored token is predicted by a (sparse) decode
  step. A context of a single token has nothing to prefill: its first forward attends to that token alone.
  Requests with the same context share one prefill (the cache is forked). This costs one forward per
  continuation token, one request at a time (``batch_size`` applies to ``generate_until`` only), and is checked
  like generation. With a dense config (``TwilightConfig.is_dense``: full selector, no pruning) decode steps
  equal dense attention, so HFLM's teacher-forced path is used as is.

Budgets: after each request type (lm-eval hands the model all requests of one type at once) and at the end of
the run, the mean attended and context tokens per decode step so far (``twilight.budget_stats(model)``) are logged
through lm-eval's logger; ``TwilightLM.budget_summary`` holds the latest report, and lm-eval's results JSON
carries it under ``config.twilight`` (with the config's name and fields), through HFLM's ``get_model_info``.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

import twilight
from twilight.config import ConfigError, TwilightConfig

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    if err.name != "lm_eval":
        raise
    raise ImportError("twilight.integrations.lm_eval needs lm-evaluation-harness: pip install 'twilight[lm-eval]' "
                      "(or pip install 'lm-eval>=0.4.10')") from err

__all__ = ["TwilightLM", "MODEL_NAME", "load_twilight_config", "main"]

#: The name lm-eval knows the model type by (``--model twilight``).
MODEL_NAME = "twilight"
DEFAULT_TWILIGHT_CONFIG = "quest-twilight"
#: lm-eval's ``setup_logging`` configures the ``lm_eval`` logger only: a child of it prints in lm-eval's format,
#: at its verbosity.
eval_logger = logging.getLogger("lm_eval.twilight")
#: The fields of ``BudgetStats.as_dict()`` reported after a run (per layer / per head are left out).
_BUDGET_KEYS = ("decode_steps", "mean_attended_tokens", "mean_context_tokens", "attended_fraction",
                "mean_kv_tokens_read", "min_attended_tokens", "max_attended_tokens")


def load_twilight_config(spec: Any) -> TwilightConfig:
    """The ``twilight_config`` model argument as a ``TwilightConfig``; ``ConfigError`` naming the argument.

    ``dense_below="auto"`` becomes ``0`` (sparse from the first decode step), as in ``twilight eval``.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ConfigError(f"twilight_config: empty; give a preset ({', '.join(twilight.PRESETS)}) or a JSON "
                          "config path")
    try:
        cfg = TwilightConfig.load(spec.strip() if isinstance(spec, str) else spec)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError; json.JSONDecodeError too
        raise ConfigError(f"twilight_config={spec!r}: {err}") from err
    if cfg.dense_below == "auto":
        cfg = cfg.replace(dense_below=0)
    return cfg


def _default_device(device: Any) -> str:
    """Where to load the embedded model: ``device`` unless it names an accelerator this machine lacks
    (lm-eval's CLI passes ``cuda:0`` by default), as HFLM itself falls back."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        eval_logger.info("device=%s but CUDA is not available: loading %s on the CPU", device,
                         twilight.DEFAULT_MODEL_ID)
        return "cpu"
    return device


def _default_dtype(dtype: Any, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16, auto)")
    return value


class TwilightLM(HFLM):
    """lm-eval's ``HFLM`` on a model patched by ``twilight.patch`` (``--model twilight``); see the module doc.

    Attributes:
        twilight_config: the ``TwilightConfig`` the model is patched with.
        budget_summary: the latest budget report (``None`` before the first request batch): the config's
            ``name`` and ``BudgetStats.as_dict()``'s scalar fields, accumulated since the model was patched.
    """

    def __init__(self, pretrained: Any = None, twilight_config: Any = DEFAULT_TWILIGHT_CONFIG, **kwargs: Any):
        cfg = load_twilight_config(twilight_config)  # before loading anything: a typo fails fast
        if pretrained is None or pretrained == twilight.DEFAULT_MODEL_ID:
            device = _default_device(kwargs.get("device"))
            dtype = _default_dtype(kwargs.get("dtype"), device)
            model, tokenizer = twilight.load_default_model(dtype=dtype, device=device)
            if kwargs.get("tokenizer") is None:
                kwargs["tokenizer"] = tokenizer
            pretrained = model
        super().__init__(pretrained=pretrained, **kwargs)
        try:
            twilight.patch(self.model, cfg)
        except (ValueError, TypeError, NotImplementedError, ImportError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"twilight_config={cfg.name!r}: cannot patch {type(self.model).__name__} "
                             f"(pretrained={getattr(self.model, 'name_or_path', '?')!r}): {first}") from err
        self.twilight_config = cfg
        self.budget_summary: dict | None = None
        from twilight.integrations.hf import compat

        self._cache_name = compat.cache_parameter(type(self.model).forward, type(self.model).__name__)
        eval_logger.info("twilight: %s patched with config %r (%s selector, %s pruner)%s",
                         type(self.model).__name__, cfg.name, cfg.selector.type, cfg.pruner.type,
                         "; dense: loglikelihood uses one teacher-forced forward" if cfg.is_dense else
                         "; loglikelihood scores every continuation token with a decode step")

    # ------------------------------------------------------------------------------------------- helpers
    def _autocast(self):
        dtype = getattr(self, "mixed_precision_dtype", None)
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def _engagement(self) -> dict:
        from twilight.integrations.hf import engagement

        return engagement(self.model)

    def _check_engaged(self, before: dict, what: str) -> None:
        """``TwilightNotEngagedError`` unless every decode step since ``before`` went through Twilight."""
        from twilight.integrations.hf import TwilightNotEngagedError

        after = self._engagement()
        decoded = after["decode_forwards"] - before["decode_forwards"]
        served = after["twilight_forwards"] - before["twilight_forwards"]
        if served < decoded:
            cause = after.get("dense_cause") or "no decode step reached Twilight's attention function"
            raise TwilightNotEngagedError(
                f"{what}: {decoded - served} of {decoded} decode step(s) did not go through Twilight ({cause}); "
                f"refusing to report them as twilight_config={self.twilight_config.name!r}")

    def _update_budget(self, what: str) -> dict:
        stats = twilight.budget_stats(self.model).as_dict()
        summary = {"config": self.twilight_config.name, **{k: stats[k] for k in _BUDGET_KEYS}}
        self.budget_summary = summary
        if summary["decode_steps"]:
            eval_logger.info(
                "twilight budget [%s] after %s: %d decode steps, mean %.1f of %.1f context tokens attended per "
                "head (%.1f%%), %.1f kv tokens read per kv-head", summary["config"], what, summary["decode_steps"],
                summary["mean_attended_tokens"], summary["mean_context_tokens"],
                100 * summary["attended_fraction"], summary["mean_kv_tokens_read"])
        else:
            eval_logger.info("twilight budget [%s] after %s: no decode steps so far", summary["config"], what)
        return summary

    # ------------------------------------------------------------------------------------ request types
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._update_budget(f"{len(requests)} loglikelihood request(s)")
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._update_budget(f"{len(requests)} loglikelihood_rolling request(s)")
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._update_budget(f"{len(requests)} generate_until request(s)")
        return out

    def _model_call(self, inps, attn_mask=None, labels=None):
        # A scoring-only forward (dense config, batch-size detection): no cache for it.
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad(), self._autocast():
            return self.model(inps, use_cache=False).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        before = self._engagement()
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._check_engaged(before, f"generate_until (a batch of {context.shape[0]})")
        # Reading the stats folds the steps recorded so far: BudgetStats folds pending steps by stacking them, which
        # fails when they mix batch sizes (the last batch is smaller, loglikelihood runs one at a time).
        twilight.budget_stats(self.model).as_dict()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """``(log P(continuation | context), is_greedy)`` per request, every continuation token scored by a decode
        step (see the module doc); HFLM's teacher-forced path for a dense config."""
        if self.twilight_config.is_dense:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm

        from twilight.integrations.hf import fork_cache, make_cache

        # Group by what is prefilled, so requests with the same context (multiple choice) share one prefill.
        groups: dict[tuple, list[tuple[int, list[int], int]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"loglikelihood request {index}: empty context or continuation tokens")
            if len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood request {index}: the continuation has {len(continuation)} tokens, "
                                 f"more than max_length={self.max_length}")
            tokens = list(context) + list(continuation)
            if len(tokens) > self.max_length + 1:  # as HFLM: keep the last max_length + 1 (the last is not input)
                eval_logger.warning("Combined length of context (%d) and continuation (%d) exceeds the model's "
                                    "maximum length (%d): truncating %d tokens from the left.", len(context),
                                    len(continuation), self.max_length, len(tokens) - self.max_length - 1)
                tokens = tokens[-(self.max_length + 1):]
            num_prefill = len(tokens) - len(continuation) - 1
            groups.setdefault(tuple(tokens[:num_prefill]), []).append((index, tokens[num_prefill:],
                                                                      len(continuation)))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running loglikelihood requests (twilight decode steps)")
        for prefix, members in groups.items():
            shared = self._prefill(list(prefix)) if prefix else None
            for position, (index, steps, num_scored) in enumerate(members):
                if shared is None:
                    cache = make_cache(self.model)
                else:  # the last member consumes the prefilled cache, the others decode from copies
                    cache = shared if position == len(members) - 1 else fork_cache(self.model, shared)
                before = self._engagement()
                answer = self._score_by_decode_steps(cache, len(prefix), steps, num_scored)
                self._check_engaged(before, f"loglikelihood request {index}")
                results[index] = answer
                request_str = requests[index][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return results

    def _prefill(self, token_ids: list[int]):
        """A fresh ``TwilightCache`` holding ``token_ids`` (one dense forward, as generate's prefill)."""
        from twilight.integrations.hf import make_cache

        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, P]
        cache = make_cache(self.model)
        with torch.inference_mode(), self._autocast():
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                       **{self._cache_name: cache})
        return cache

    def _score_by_decode_steps(self, cache, seen: int, steps: list[int], num_scored: int) -> tuple[float, bool]:
        """Feed ``steps[:-1]`` one token per forward after ``seen`` cached tokens; token ``steps[i + 1]`` is scored
        with the logits of the forward of ``steps[i]``. Returns ``(sum of log-probs, every target the argmax)``."""
        assert len(steps) == num_scored + 1
        softmax_dtype = getattr(self, "softmax_dtype", None) or torch.float32
        total = torch.zeros((), dtype=torch.float64)
        greedy = True
        with torch.inference_mode(), self._autocast():
            for i in range(num_scored):
                seen += 1
                out = self.model(input_ids=torch.tensor([[steps[i]]], dtype=torch.long, device=self.device),
                                 attention_mask=torch.ones(1, seen, dtype=torch.long, device=self.device),
                                 use_cache=True, logits_to_keep=1, **{self._cache_name: cache})
                logprobs = F.log_softmax(out.logits[0, -1], dim=-1, dtype=softmax_dtype)  # [V]
                target = steps[i + 1]
                total += logprobs[target].double().cpu()
                greedy = greedy and int(logprobs.argmax()) == target
        return float(total), greedy

    # ---------------------------------------------------------------------------------------- results
    def get_model_info(self) -> dict:
        """HFLM's model info plus ``twilight``: the config's name and fields, and the budget report."""
        info = super().get_model_info()
        summary = self._update_budget("the run")
        info["twilight"] = {"config_name": self.twilight_config.name, "config": self.twilight_config.to_dict(),
                            "budget": summary}
        return info


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (``lm_eval ARGS``) with ``--model twilight`` registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    # `python -m twilight.integrations.lm_eval`: this copy runs as __main__; the importable module registers the
    # model (registering this copy's class too would be a second, conflicting `twilight`).
    from twilight.integrations.lm_eval import main as _main

    sys.exit(_main())
else:
    register_model(MODEL_NAME)(TwilightLM)
