"""The selector registry (``twilight.select.registry``): a selector built in this file alone (``every_nth``: every
``n``-th valid token) is configured by dict and JSON, validated by its own rules, patched into a tiny Llama and
decodes as dense attention restricted to its tokens; the built-in selectors' specs cover every ``SelectorConfig``
field; the README's selector table is the registry's."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

import twilight
import twilight.config
import twilight.select
from twilight._tensors import compact
from twilight.config import ConfigError, SelectorConfig, TwilightConfig
from twilight.select import make_selector, observation_key, selector_cache_needs
from twilight.select.registry import (
    SELECTORS,
    SelectorSpec,
    register_selector,
    registered,
    selector_table,
    unregister_selector,
)
from twilight.selection import Selection

BUILTINS = ("full", "quest", "streaming", "double_sparse", "oracle_topk", "sparq", "tidal", "snapkv", "h2o")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ a selector of our own
class EveryNth:
    """Every ``n``-th valid token of each sequence (its first valid token, then every ``n``-th after it)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, q, cache, plan) -> Selection:
        B, H, L = cache.batch, cache.num_kv_heads, cache.length
        pos = torch.arange(L, device=cache.device).view(1, 1, L)
        start = cache.start.view(-1, 1, 1)
        keep = (pos >= start) & ((pos - start) % self.n == 0)
        width = None if plan.host_reads else L
        out, counts = compact(pos.expand(B, 1, L), keep, width=width)
        return Selection(out.expand(B, H, -1).contiguous(), counts.expand(B, H).contiguous())


def _check_every_nth(cfg: SelectorConfig) -> None:
    n = cfg.extra["n"]  # what a selector of your own raises: a ConfigError naming the field
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"selector.n={n!r} is invalid: must be an integer >= 1")


EVERY_NTH = SelectorSpec(name="every_nth", build=lambda cfg, layer_idx=0, num_layers=None: EveryNth(cfg.extra["n"]),
                         picks="every `n`-th valid token", gqa="equal", params={"n": 2}, validate=_check_every_nth,
                         legacy_names=("every_other",))


@pytest.fixture
def every_nth():
    with registered(EVERY_NTH) as spec:
        yield spec
    assert "every_nth" not in SELECTORS


def test_registered_selector_is_a_selector_type_while_registered(every_nth):
    assert twilight.config.SELECTOR_TYPES == (*BUILTINS, "every_nth")
    assert twilight.select.SELECTOR_TYPES == (*BUILTINS, "every_nth")
    assert "every_nth" not in twilight.config.GQA_HEAD_SELECTORS


def test_registration_is_undone():
    with registered(EVERY_NTH):
        TwilightConfig.load({"selector": {"type": "every_nth"}})
    assert twilight.config.SELECTOR_TYPES == BUILTINS
    with pytest.raises(ConfigError, match=r"selector.type='every_nth' is invalid: must be one of full, quest"):
        TwilightConfig.load({"selector": {"type": "every_nth"}})
    register_selector(EVERY_NTH)
    try:
        assert TwilightConfig.load({"selector": "every_nth"}).selector.extra == {"n": 2}
    finally:
        assert unregister_selector("every_nth") is EVERY_NTH
    assert "every_nth" not in SELECTORS
    with pytest.raises(KeyError):
        unregister_selector("every_nth")


def test_registry_refuses_clashes():
    with pytest.raises(ValueError, match="already registered"):
        register_selector(dataclasses.replace(EVERY_NTH, name="quest"))
    with pytest.raises(ValueError, match=r"legacy name\(s\) \['ds'\] already name \['double_sparse'\]"):
        register_selector(dataclasses.replace(EVERY_NTH, legacy_names=("ds",)))
    with pytest.raises(ValueError, match=r"params \['page_size'\] are SelectorConfig fields"):
        register_selector(dataclasses.replace(EVERY_NTH, params={"page_size": 4}))
    with pytest.raises(ValueError, match="gqa"):
        dataclasses.replace(EVERY_NTH, gqa="heads")
    assert tuple(SELECTORS) == BUILTINS


def test_config_of_a_registered_selector(every_nth, tmp_path):
    cfg = TwilightConfig.load({"selector": {"type": "every_nth", "n": 3, "token_budget": 64}, "pruner": "none"})
    assert cfg.selector.extra == {"n": 3} and cfg.selector.token_budget == 64
    data = cfg.to_dict()
    assert data["selector"]["n"] == 3 and "extra" not in data["selector"]
    assert TwilightConfig.load(data) == cfg  # dict round trip
    cfg.save(tmp_path / "every.json")
    with open(tmp_path / "every.json") as f:
        assert json.load(f)["selector"]["n"] == 3
    assert TwilightConfig.load(str(tmp_path / "every.json")).selector == cfg.selector  # JSON round trip
    assert TwilightConfig.load({"selector": {"type": "every_nth"}}).selector.extra == {"n": 2}  # its default
    # its own validation, in the library's message style, naming the field
    with pytest.raises(ConfigError, match=r"^selector.n=0 is invalid: must be an integer >= 1$"):
        TwilightConfig.load({"selector": {"type": "every_nth", "n": 0}})
    with pytest.raises(ConfigError, match=r"selector.n='2' is invalid"):
        TwilightConfig.load({"selector": {"type": "every_nth", "n": "2"}})
    # its params are its own: another selector refuses them, and it refuses keys it did not declare
    with pytest.raises(ConfigError, match=r"unknown selector key\(s\) \['n'\]; allowed keys"):
        TwilightConfig.load({"selector": {"type": "quest", "n": 2}})
    with pytest.raises(ConfigError, match=r"unknown selector key\(s\) \['m'\]; allowed keys: \[.*'n'"):
        TwilightConfig.load({"selector": {"type": "every_nth", "m": 2}})
    with pytest.raises(ConfigError, match=r"unknown selector key\(s\) \['m'\] for type 'every_nth'"):
        TwilightConfig(selector=SelectorConfig(type="every_nth", extra={"m": 1}))
    # the shared checks still apply (gqa: it scores nothing, so both modes are allowed and equal)
    assert TwilightConfig.load({"selector": {"type": "every_nth", "gqa": "head"}}).selector.gqa == "head"
    with pytest.raises(ConfigError, match="selector.token_budget=0"):
        TwilightConfig.load({"selector": {"type": "every_nth", "token_budget": 0}})
    # the original code's config files name it by its legacy spelling
    legacy = TwilightConfig.load({"selector": {"type": "every_other", "n": 2, "budget": 32},
                                  "weight_estimator": {"type": "none"}})
    assert (legacy.selector.type, legacy.selector.extra, legacy.selector.token_budget) == ("every_nth", {"n": 2}, 32)
    # what it observes and keeps: nothing
    assert observation_key(cfg) is None and selector_cache_needs(cfg.selector, 0, 2) == {}


def test_gqa_head_is_refused_by_a_group_only_selector(every_nth):
    group_only = dataclasses.replace(EVERY_NTH, name="every_nth_group", gqa="group", legacy_names=())
    with registered(group_only):
        with pytest.raises(ConfigError, match="selector.type='every_nth_group' implements gqa='group' only"):
            TwilightConfig.load({"selector": {"type": "every_nth_group", "gqa": "head"}})


def test_model_check_hook_runs_in_the_pipeline(every_nth):
    def at_least_four_layers(config, num_layers):
        if num_layers < 4:
            raise ConfigError(f"every_nth_deep needs 4 layers, the model has {num_layers}")

    deep = dataclasses.replace(EVERY_NTH, name="every_nth_deep", legacy_names=(), check_model=at_least_four_layers)
    with registered(deep):
        cfg = {"selector": {"type": "every_nth_deep"}, "pruner": "none"}
        twilight.TwilightPipeline(cfg, num_layers=4, num_q_heads=4, num_kv_heads=2)
        with pytest.raises(ConfigError, match="needs 4 layers, the model has 3"):
            twilight.TwilightPipeline(cfg, num_layers=3, num_q_heads=4, num_kv_heads=2)


def test_pipeline_decodes_with_a_registered_selector(every_nth):
    pipe = twilight.TwilightPipeline({"selector": {"type": "every_nth", "n": 3}, "pruner": "none",
                                      "estimator": "exact", "dense_layers": [], "dense_below": 0, "backend": "torch"},
                                     num_layers=1, num_q_heads=4, num_kv_heads=2)
    assert isinstance(make_selector(pipe.config.selector), EveryNth)
    g = torch.Generator().manual_seed(0)
    k, v, q = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 4, 8,
                                                                                                        generator=g)
    cache = pipe.new_cache(0, 1, 2, 8)
    cache.append(k, v)
    out = pipe.decode(0, q, cache, scale=8 ** -0.5)
    keep = torch.arange(0, 20, 3)  # 0, 3, ..., 18
    kk, vv = k[0, :, keep].repeat_interleave(2, 0), v[0, :, keep].repeat_interleave(2, 0)  # per query head
    ref = torch.softmax(torch.einsum("hd,hkd->hk", q[0], kk) * 8 ** -0.5, -1)
    torch.testing.assert_close(out[0], torch.einsum("hk,hkd->hd", ref, vv), atol=1e-5, rtol=1e-5)
    assert pipe.stats.as_dict()["mean_attended_tokens"] == len(keep)


# -------------------------------------------------------------------------------------------- end to end
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def test_patched_model_decodes_with_a_selector_built_in_this_file(every_nth):
    """``twilight.patch`` with the JSON-style config of ``every_nth``: each decode step's logits equal one forward of
    the unpatched model over the same tokens whose attention mask lets the prompt attend causally and each decode
    token attend to every ``n``-th token up to its own position only; the stats count those tokens."""
    n, prompt, new = 3, 40, 6
    model = _tiny_llama()
    ids = torch.randint(3, 300, (1, prompt), generator=torch.Generator().manual_seed(1))
    cfg = {"selector": {"type": "every_nth", "n": n}, "estimator": {"type": "exact"}, "pruner": {"type": "none"},
           "dense_layers": [], "dense_below": 0, "backend": "torch"}
    twilight.patch(model, json.loads(json.dumps(cfg)))
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        stats = twilight.budget_stats(model).as_dict()
    finally:
        twilight.unpatch(model)
    seq = out.sequences  # [1, prompt + new]
    T = seq.shape[1]
    pos = torch.arange(T)
    allowed = pos.view(1, T) <= pos.view(T, 1)  # causal
    allowed[prompt:] &= (pos % n == 0).view(1, T)  # decode rows: every n-th token only
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = model(seq, attention_mask=mask).logits[0]  # [T, vocab]
    got = torch.stack(out.scores)[:, 0]  # step i's logits come from position prompt - 1 + i
    torch.testing.assert_close(got, ref[prompt - 1:T - 1], atol=1e-4, rtol=1e-4)
    assert stats["decode_steps"] == new - 1
    kept = [len(range(0, length, n)) for length in range(prompt + 1, T)]  # each decode step's cache length
    assert stats["mean_attended_tokens"] == pytest.approx(sum(kept) / len(kept))


# -------------------------------------------------------------------------------------------- the built-ins
def test_builtin_selectors_own_every_selector_config_field():
    owned = [name for spec in SELECTORS.values() for name in spec.fields]
    shared = {"type", "token_budget", "gqa", "extra"}
    fields = {f.name for f in dataclasses.fields(SelectorConfig)}
    assert set(owned) == fields - shared
    assert all(not spec.params for spec in SELECTORS.values())  # built-in parameters are all SelectorConfig fields
    for spec in SELECTORS.values():  # the README's "its own fields" cell names every field it owns
        if spec.fields_doc is not None:
            assert all(f"`{name}`" in spec.fields_doc for name in spec.fields), spec.name


def test_builtin_legacy_spellings_and_hooks():
    legacy = {alias: spec.name for spec in SELECTORS.values() for alias in spec.legacy_names}
    assert legacy == {"ds": "double_sparse", "double_sparsity": "double_sparse", "dense": "full", "none": "full",
                      "oracle": "oracle_topk", "streamingllm": "streaming", "tidal_decode": "tidal",
                      "snap_kv": "snapkv"}
    assert [n for n, s in SELECTORS.items() if s.observes] == ["snapkv", "h2o"]
    assert [n for n, s in SELECTORS.items() if s.cache_needs] == ["quest", "double_sparse"]
    assert [n for n, s in SELECTORS.items() if s.check_model] == ["tidal"]
    assert {n: s.gqa for n, s in SELECTORS.items() if s.gqa != "both"} == {"full": "equal", "streaming": "equal",
                                                                            "h2o": "group"}


# -------------------------------------------------------------------------------------------- the README
def _readme_table_problems() -> list[str]:
    """How README.md's selector table differs from the registry's (``selector_table()``): each registered
    selector's row, exactly, in registry order, and no other row."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    header = "| selector | picks | `gqa` | its own fields |"
    if header not in lines:
        return ["README.md has no selector table"]
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    readme_rows = {re.match(r"\| `(\w+)` \|", row).group(1): row for row in lines[start + 2:end]}
    expected = selector_table().split("\n")
    expected_rows = {re.match(r"\| `(\w+)` \|", row).group(1): row for row in expected[2:]}
    problems = [f"{name}: missing from README.md's selector table" for name in expected_rows
                if name not in readme_rows]
    problems += [f"{name}: README.md's row differs from the registry's:\n  {readme_rows[name]}\n  {row}"
                 for name, row in expected_rows.items() if name in readme_rows and readme_rows[name] != row]
    problems += [f"{name}: in README.md's selector table but not registered" for name in readme_rows
                 if name not in expected_rows]
    if not problems and lines[start:end] != expected:
        problems.append("README.md's selector table is not in registry order (regenerate it: selector_table())")
    return problems


def test_readme_selector_table_is_the_registry():
    assert _readme_table_problems() == []


def test_readme_check_fails_for_a_missing_or_changed_row():
    with registered(EVERY_NTH):
        assert _readme_table_problems() == ["every_nth: missing from README.md's selector table"]
    quest = SELECTORS["quest"]
    SELECTORS["quest"] = dataclasses.replace(quest, gqa="group")
    try:
        assert [p.split(":")[0] for p in _readme_table_problems()] == ["quest"]
    finally:
        SELECTORS["quest"] = quest
