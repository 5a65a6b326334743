"""twilight.config: presets, JSON round trip, dict schemas (ours and the original Twilight code's), validation."""
import json
import math
import pathlib

import pytest

import twilight
from twilight.config import (BACKENDS, ESTIMATOR_TYPES, PRESETS, PRUNER_TYPES, SELECTOR_TYPES, ConfigError,
                             EstimatorConfig, PrunerConfig, SelectorConfig, TwilightConfig)


def test_config_error_is_value_error_and_exported():
    assert issubclass(ConfigError, ValueError)
    assert twilight.ConfigError is ConfigError
    assert twilight.TwilightConfig is TwilightConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name):
    cfg = TwilightConfig.load(name)
    assert cfg.name == name
    assert cfg.selector.type in SELECTOR_TYPES
    assert cfg.estimator.type in ESTIMATOR_TYPES
    assert cfg.pruner.type in PRUNER_TYPES
    assert cfg.backend in BACKENDS


def test_required_presets_exist_with_their_meaning():
    assert {"dense", "quest", "twilight", "quest-twilight", "streaming"} <= set(PRESETS)
    dense = TwilightConfig.load("dense")
    assert dense.is_dense and dense.selector.type == "full" and dense.pruner.type == "none"
    qt = TwilightConfig.load("quest-twilight")
    assert (qt.selector.type, qt.estimator.type, qt.pruner.type) == ("quest", "int4", "top_p")
    assert 0 < qt.pruner.p < 1 and qt.dense_layers == [0, 1] and not qt.is_dense
    assert TwilightConfig.load("quest").pruner.type == "none"
    assert TwilightConfig.load("streaming").selector.type == "streaming"
    tw = TwilightConfig.load("twilight")
    assert (tw.selector.type, tw.pruner.type) == ("full", "top_p") and not tw.is_dense


def test_defaults_are_valid():
    cfg = TwilightConfig()
    assert cfg.estimator.type == "int4" and cfg.estimator.bits == 4
    assert EstimatorConfig("int8").bits == 8 and EstimatorConfig("exact").bits is None
    assert cfg.dense_layers == [0, 1]


def test_is_dense_only_for_full_selector_without_pruning():
    assert TwilightConfig.load({"selector": "full", "pruner": "none"}).is_dense
    assert not TwilightConfig.load({"selector": "full", "pruner": "top_p"}).is_dense
    assert not TwilightConfig.load({"selector": "quest", "pruner": "none"}).is_dense


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(tmp_path, name):
    cfg = TwilightConfig.load(name)
    path = tmp_path / "cfg.json"
    cfg.save(path)
    data = json.loads(path.read_text())
    assert data == cfg.to_dict()
    back = TwilightConfig.load(path)  # a PathLike
    assert back.to_dict() | {"name": name} == cfg.to_dict()
    assert back.name == "cfg"  # named after the file
    back_str = TwilightConfig.load(str(path))
    assert back_str.selector == cfg.selector and back_str.pruner == cfg.pruner


def test_dict_schema_and_shorthand():
    cfg = TwilightConfig.load({"selector": {"type": "quest", "token_budget": 4096, "page_size": 32},
                               "estimator": "int8", "pruner": {"type": "top_p", "p": 0.9},
                               "dense_layers": [0], "backend": "torch", "name": "mine"})
    assert cfg.selector == SelectorConfig(type="quest", token_budget=4096, page_size=32)
    assert cfg.estimator == EstimatorConfig("int8")
    assert cfg.pruner.type == "top_p" and cfg.pruner.p == pytest.approx(0.9)
    assert cfg.dense_layers == [0] and cfg.backend == "torch" and cfg.name == "mine"
    # to_dict -> from_dict is the identity
    assert TwilightConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_load_copies_a_config():
    cfg = TwilightConfig.load("quest-twilight")
    copy = TwilightConfig.load(cfg)
    assert copy == cfg and copy is not cfg and copy.selector is not cfg.selector
    copy.selector.token_budget = 1
    assert cfg.selector.token_budget == 8192


def test_replace_validates():
    cfg = TwilightConfig.load("quest-twilight")
    assert cfg.replace(backend="torch").backend == "torch"
    assert cfg.backend == "auto"
    with pytest.raises(ConfigError, match="backend"):
        cfg.replace(backend="tpu")


def test_original_twilight_format():
    legacy = {"selector": {"type": "quest", "token_budget": 8192, "page_size": 16},
              "weight_estimator": {"type": "min_max_quant", "quant_bit": 4},
              "weight_pruner": {"type": "top_p", "top_p": 0.85}, "skip_first_two_layers": True}
    cfg = TwilightConfig.load(legacy)
    assert cfg.selector == SelectorConfig(type="quest", token_budget=8192, page_size=16)
    assert cfg.estimator.type == "int4"
    assert cfg.pruner.type == "top_p" and cfg.pruner.p == pytest.approx(0.85)
    assert cfg.dense_layers == [0, 1]


def test_original_twilight_format_variants():
    cfg = TwilightConfig.load({"selector": {"type": "full"},
                               "weight_estimator": {"type": "min_max_quant", "quant_bit": 8},
                               "weight_pruner": {"type": "threshold", "threshold": 0.01},
                               "skip_first_two_layers": False})
    assert cfg.estimator.type == "int8" and cfg.pruner.type == "threshold"
    assert cfg.pruner.threshold == pytest.approx(0.01) and cfg.dense_layers == []
    cfg = TwilightConfig.load({"selector": {"type": "ds", "budget": 1024, "channels_path": "x.json"},
                               "weight_estimator": {"type": "exact"}, "weight_pruner": {"type": "top_k", "top_k": 64}})
    assert cfg.selector.type == "double_sparse" and cfg.selector.token_budget == 1024
    assert cfg.estimator.type == "exact" and cfg.pruner.type == "top_k" and cfg.pruner.k == 64
    # no pruner in an original config means no pruning
    cfg = TwilightConfig.load({"selector": {"type": "quest", "token_budget": 512, "page_size": 16},
                               "weight_estimator": {"type": "min_max_quant", "quant_bit": 4}})
    assert cfg.pruner.type == "none" and cfg.dense_layers == []


# ---------------------------------------------------------------------------------------------- bad input
def _raises(spec, *needles):
    """Loading ``spec`` raises ConfigError whose message contains every needle."""
    with pytest.raises(ConfigError) as info:
        TwilightConfig.load(spec)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"
    return msg


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf"), "0.5", None, True])
def test_bad_p(p):
    _raises({"pruner": {"type": "top_p", "p": p}}, "pruner.p", "(0, 1]")


@pytest.mark.parametrize("t", [0, -1e-3, 2.0, float("nan")])
def test_bad_threshold(t):
    _raises({"pruner": {"type": "threshold", "threshold": t}}, "pruner.threshold", "(0, 1]")


@pytest.mark.parametrize("p", [1, 1.0, 1e-9, 0.5])
def test_good_p(p):
    assert TwilightConfig.load({"pruner": {"type": "top_p", "p": p}}).pruner.p == pytest.approx(float(p))


@pytest.mark.parametrize("budget", [0, -5, 1.5, "8", None])
def test_bad_token_budget(budget):
    _raises({"selector": {"type": "quest", "token_budget": budget}}, "selector.token_budget", ">= 1")


@pytest.mark.parametrize("ps", [0, -16, 2.5])
def test_bad_page_size(ps):
    _raises({"selector": {"type": "quest", "page_size": ps}}, "selector.page_size", ">= 1")


@pytest.mark.parametrize("field,value,minimum", [("window", 0, "1"), ("sink_tokens", -1, "0"),
                                                 ("num_channels", 0, "1")])
def test_bad_selector_ints(field, value, minimum):
    _raises({"selector": {"type": "streaming", field: value}}, f"selector.{field}", f">= {minimum}")


def test_bad_k():
    _raises({"pruner": {"type": "top_k", "k": 0}}, "pruner.k", ">= 1")


def test_unknown_selector_type():
    msg = _raises({"selector": {"type": "magic"}}, "selector.type", "magic")
    for t in SELECTOR_TYPES:
        assert t in msg


def test_unknown_estimator_type():
    msg = _raises({"estimator": {"type": "int2"}}, "estimator.type", "int2")
    for t in ESTIMATOR_TYPES:
        assert t in msg


def test_unknown_pruner_type():
    msg = _raises({"pruner": {"type": "top_q"}}, "pruner.type", "top_q")
    for t in PRUNER_TYPES:
        assert t in msg


def test_unknown_backend():
    msg = _raises({"backend": "tpu"}, "backend", "tpu")
    for b in BACKENDS:
        assert b in msg


def test_unknown_top_level_key():
    _raises({"selector": "full", "pruners": {"type": "top_p"}}, "pruners", "allowed keys", "pruner")


def test_unknown_sub_key():
    _raises({"selector": {"type": "quest", "budget": 10}}, "budget", "allowed keys", "token_budget")
    _raises({"pruner": {"type": "top_p", "top_p": 0.9}}, "top_p", "allowed keys")


def test_sub_config_must_be_object():
    _raises({"selector": 3}, "selector")


def test_double_sparse_needs_channels_path():
    _raises({"selector": {"type": "double_sparse"}}, "selector.channels_path")


@pytest.mark.parametrize("dense_layers", ["0,1", [-1], [0.5], 3])
def test_bad_dense_layers(dense_layers):
    _raises({"dense_layers": dense_layers}, "dense_layers")


def test_unknown_preset_names_the_presets():
    msg = _raises("quest-twilite", "quest-twilite")
    for name in PRESETS:
        assert name in msg


def test_missing_json_file(tmp_path):
    missing = tmp_path / "nope.json"
    _raises(str(missing), "nope.json", "does not exist")
    _raises(missing, "does not exist")


def test_bad_spec_type():
    _raises(42, "int")


def test_json_file_with_bad_content(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"pruner": {"type": "top_p", "p": 2}}))
    _raises(path, "pruner.p")
    path.write_text(json.dumps([1, 2]))
    _raises(path, "JSON object")


@pytest.mark.parametrize("legacy,needle", [
    ({"weight_estimator": {"type": "min_max_quant", "quant_bit": 2}}, "weight_estimator.quant_bit"),
    ({"weight_estimator": {"type": "lsh"}}, "weight_estimator.type"),
    ({"weight_pruner": {"type": "top_z"}}, "weight_pruner.type"),
    ({"weight_pruner": {"type": "top_p", "top_p": 1.5}}, "pruner.p"),
    ({"weight_pruner": {"type": "top_p"}, "extra": 1}, "extra"),
])
def test_bad_original_format(legacy, needle):
    _raises(legacy, needle)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="pruner.p"):
        TwilightConfig(pruner=PrunerConfig(p=0.0))
    with pytest.raises(ConfigError, match="selector"):
        TwilightConfig(selector={"type": "full"})
    assert math.isclose(TwilightConfig(pruner=PrunerConfig(p=1)).pruner.p, 1.0)


def test_save_is_readable_json(tmp_path):
    path = pathlib.Path(tmp_path) / "x.json"
    TwilightConfig.load("quest-twilight").save(path)
    data = json.loads(path.read_text())
    assert data["selector"]["type"] == "quest" and data["pruner"]["p"] == pytest.approx(0.85)
