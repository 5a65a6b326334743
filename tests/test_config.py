"""twilight.config: presets, JSON round trip, dict schemas (ours and the original Twilight code's), validation."""
import json
import math
import pathlib

import pytest

import twilight
from twilight.config import (
    BACKENDS,
    ESTIMATOR_TYPES,
    PRESETS,
    PRUNER_TYPES,
    SELECTOR_TYPES,
    ConfigError,
    EstimatorConfig,
    PrunerConfig,
    SelectorConfig,
    TwilightConfig,
)


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
    # the original code selects per query head (it repeats K/V before every selector): gqa="head"
    assert cfg.selector == SelectorConfig(type="quest", token_budget=8192, page_size=16, gqa="head")
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
    # no pruner in an original config means no pruning; a missing skip_first_two_layers means true, the
    # original code's default (sparse_config.get("skip_first_two_layers", True))
    cfg = TwilightConfig.load({"selector": {"type": "quest", "token_budget": 512, "page_size": 16},
                               "weight_estimator": {"type": "min_max_quant", "quant_bit": 4}})
    assert cfg.pruner.type == "none" and cfg.dense_layers == [0, 1]


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


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "pruner": {"type": "top_p",\n  "p": 0.9,\n}\n')   # a trailing comma on line 3
    with pytest.raises(ConfigError) as info:
        TwilightConfig.load(path)
    msg = str(info.value)
    assert str(path) in msg and "line 4" in msg and "not valid JSON" in msg
    cause = info.value.__cause__
    assert isinstance(cause, json.JSONDecodeError) and cause.lineno == 4
    path.write_text("")
    _raises(str(path), str(path), "line 1, column 1")


def test_unreadable_config_files_raise_config_error(tmp_path):
    folder = tmp_path / "configs.json"
    folder.mkdir()
    _raises(folder, str(folder), "is a directory")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{\n"name": "caf\xe9"}'.encode("latin-1"))
    _raises(latin, str(latin), "not UTF-8", "line 2")


def test_canonical_json_ignores_the_name_and_sees_every_setting():
    a = TwilightConfig.load("quest-twilight")
    assert a.canonical_json() == a.replace(name="renamed").canonical_json()
    assert a.canonical_json() != a.replace(dense_below=0).canonical_json()
    edited = TwilightConfig.load({**a.to_dict(), "pruner": {**a.to_dict()["pruner"], "p": 0.5}})
    assert edited.canonical_json() != a.canonical_json()
    assert json.loads(a.canonical_json()) == {k: v for k, v in a.to_dict().items() if k != "name"}


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


# ---------------------------------------------------------------------------------------------- original configs
# Copies (same keys and values) of every file in the original Twilight code's benchmark/configs.
_DS_CHANNELS = "/data/chaofan/DoubleSparse/config/lmsys/longchat-7b-v1.5-32k.json"
_COMMON = {"compressor": {"type": "none"}, "skip_first_two_layers": True, "use_estimated_weights_in_attn": False}
_TWI = {"weight_estimator": {"type": "min_max_quant", "quant_bit": 4},
        "weight_pruner": {"type": "top_p", "threshold": 0.85}}
_NO_TWI = {"weight_estimator": {"type": "none"}, "weight_pruner": {"type": "none"}}


def _ds_selector(budget):
    return {"type": "ds", "quant_bit": 2, "r": 64, "config_path": _DS_CHANNELS, "token_budget": budget,
            "selected_channel": "q"}


ORIGINAL_CONFIGS = {
    "config_quest_twi": {**_COMMON, "selector": {"type": "quest", "token_budget": 8192, "chunk_size": 16}, **_TWI},
    "config_quest_1024": {**_COMMON, "selector": {"type": "quest", "token_budget": 1024, "chunk_size": 16}, **_NO_TWI},
    "config_quest_8192": {**_COMMON, "selector": {"type": "quest", "token_budget": 8192, "chunk_size": 16}, **_NO_TWI},
    "config_ds_twi": {**_COMMON, "selector": _ds_selector(8192), **_TWI},
    "config_ds_1024": {**_COMMON, "selector": _ds_selector(1024), **_NO_TWI},
    "config_ds_8192": {**_COMMON, "selector": _ds_selector(8192), **_NO_TWI},
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_CONFIGS))
def test_every_original_benchmark_config_loads(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ORIGINAL_CONFIGS[name], indent=4))
    cfg = TwilightConfig.load(path)
    assert cfg.name == name and cfg.dense_layers == [0, 1] and cfg.backend == "auto"
    budget = 1024 if name.endswith("1024") else 8192
    assert cfg.selector.token_budget == budget
    assert cfg.selector.gqa == "head"  # what the original code's selectors do: each query head its own tokens
    if name.startswith("config_quest"):
        assert cfg.selector.type == "quest" and cfg.selector.page_size == 16
    else:
        sel = cfg.selector
        assert sel.type == "double_sparse" and sel.channels_path == _DS_CHANNELS
        assert (sel.num_channels, sel.label_bits, sel.channels_key) == (64, 2, "q")
    if name.endswith("twi"):
        assert cfg.estimator.type == "int4"
        assert cfg.pruner.type == "top_p" and cfg.pruner.p == pytest.approx(0.85)
    else:
        assert cfg.estimator.type == "exact" and cfg.pruner.type == "none"
    # what it translates to is our schema and survives a round trip
    cfg.save(tmp_path / "ours.json")
    assert TwilightConfig.load(tmp_path / "ours.json").to_dict() == cfg.to_dict() | {"name": "ours"}


def _original(**changes):
    """config_ds_twi with top-level sections replaced (None: removed) or selector/pruner keys changed."""
    data = json.loads(json.dumps(ORIGINAL_CONFIGS["config_ds_twi"]))
    for key, value in changes.items():
        part, _, sub = key.partition("__")
        if sub:
            data[part][sub] = value
        elif value is None:
            data.pop(part)
        else:
            data[part] = value
    return data


@pytest.mark.parametrize("p", [0.9, 0.5, 1.0])
def test_original_top_p_threshold_is_p(p):
    assert TwilightConfig.load(_original(weight_pruner__threshold=p)).pruner.p == pytest.approx(p)
    # the spellings we accepted before still work, alone or agreeing
    pr = {"type": "top_p", "top_p": p}
    assert TwilightConfig.load(_original(weight_pruner=pr)).pruner.p == pytest.approx(p)
    pr = {"type": "top_p", "threshold": p, "p": p}
    assert TwilightConfig.load(_original(weight_pruner=pr)).pruner.p == pytest.approx(p)


def test_original_ds_variants():
    cfg = TwilightConfig.load(_original(selector__quant_bit=32, selector__selected_channel="k"))
    assert cfg.selector.label_bits is None and cfg.selector.channels_key == "k"  # 32 bits: no quantization
    cfg = TwilightConfig.load(_original(selector__quant_bit=16, selector__r=8))
    assert cfg.selector.label_bits == 16 and cfg.selector.num_channels == 8
    assert TwilightConfig.load(_original(compressor=None, use_estimated_weights_in_attn=None)).selector.label_bits == 2
    # our own field names are accepted in an original config too, when they agree
    cfg = TwilightConfig.load(_original(selector__channels_key="q", selector__label_bits=2))
    assert (cfg.selector.channels_key, cfg.selector.label_bits) == ("q", 2)


@pytest.mark.parametrize("changes,needles", [
    ({"compressor": {"type": "snap_kv", "window_size": 32}}, ["compressor.type", "snap_kv", "cannot be combined"]),
    ({"compressor": {"type": "h2o"}}, ["compressor.type", "h2o", "none"]),
    ({"compressor": {"type": "none", "ratio": 2}}, ["compressor", "ratio"]),
    ({"compressor": 3}, ["compressor"]),
    ({"use_estimated_weights_in_attn": True}, ["use_estimated_weights_in_attn", "estimated weights",
                                               "not supported"]),
    ({"use_estimated_weights_in_attn": "no"}, ["use_estimated_weights_in_attn"]),
    ({"weight_pruner__threshold": 1.5}, ["weight_pruner.threshold", "pruner.p", "(0, 1]"]),
    ({"weight_pruner__threshold": 0}, ["weight_pruner.threshold", "(0, 1]"]),
    ({"weight_pruner__top_p": 0.5}, ["weight_pruner.threshold", "weight_pruner.top_p", "disagree"]),
    ({"weight_pruner__smooth": 1}, ["weight_pruner", "smooth"]),
    ({"weight_pruner": {"type": "top_k", "top_k": 0}}, ["weight_pruner.top_k", "pruner.k"]),
    ({"weight_pruner": {"type": "threshold", "threshold": 2.0}}, ["weight_pruner.threshold", "(0, 1]"]),
    ({"weight_estimator": {"type": "max_quant", "quant_bit": 4, "smooth_k": False}},
     ["weight_estimator.type", "max_quant", "not supported"]),
    ({"weight_estimator__quant_bit": 2}, ["weight_estimator.quant_bit", "4 or 8"]),
    ({"weight_estimator__smooth_k": True}, ["weight_estimator", "smooth_k"]),
    ({"weight_estimator": {"type": "none", "quant_bit": 4}}, ["weight_estimator", "quant_bit"]),
    ({"selector__selected_channel": "v"}, ["selector.selected_channel", "'v'", "q, k"]),
    ({"selector__quant_bit": 0}, ["selector.quant_bit", "selector.label_bits"]),
    ({"selector__quant_bit": 17}, ["selector.quant_bit"]),
    ({"selector__quant_bit": 2.5}, ["selector.quant_bit"]),
    ({"selector__r": 0}, ["selector.r", ">= 1"]),
    ({"selector__r": "64"}, ["selector.r"]),
    ({"selector__config_path": ""}, ["selector.config_path", "selector.channels_path"]),
    ({"selector__config_path": 7}, ["selector.config_path"]),
    ({"selector__token_budget": 0}, ["selector.token_budget", ">= 1"]),
    ({"selector__channels_path": "other.json"}, ["selector.channels_path", "selector.config_path", "disagree"]),
    ({"selector__label_bits": 4}, ["selector.quant_bit", "selector.label_bits", "disagree"]),
    ({"selector__channels_key": "k"}, ["selector.selected_channel", "selector.channels_key", "disagree"]),
    ({"selector__lsh": 1}, ["lsh", "allowed keys"]),
    ({"selector": {"type": "quest", "token_budget": 1024, "chunk_size": 0}}, ["selector.chunk_size", ">= 1"]),
    ({"selector": {"type": "quest", "chunk_size": 16, "page_size": 32}}, ["chunk_size", "page_size", "disagree"]),
    ({"selector": {"type": "quest", "r": 4}}, ["'r'", "allowed keys"]),  # ds keys belong to ds only
    ({"skip_first_two_layers": "yes"}, ["skip_first_two_layers"]),
    ({"extra": 1}, ["extra", "allowed keys"]),
])
def test_bad_original_values_name_the_field(changes, needles):
    _raises(_original(**changes), *needles)


@pytest.mark.parametrize("field,value", [("label_bits", 0), ("label_bits", 17), ("label_bits", True),
                                         ("label_bits", "2"), ("label_bits", 2.0), ("channels_key", "v"),
                                         ("channels_key", None), ("channels_path", 3), ("channels_path", "")])
def test_bad_double_sparse_fields(field, value):
    spec = {"selector": {"type": "double_sparse", "channels_path": "ch.json", field: value}}
    _raises(spec, f"selector.{field}")


def test_double_sparse_fields_defaults_and_round_trip(tmp_path):
    sel = TwilightConfig.load({"selector": {"type": "double_sparse", "channels_path": "ch.json"}}).selector
    assert (sel.num_channels, sel.label_bits, sel.channels_key) == (16, None, "k")
    cfg = TwilightConfig.load({"selector": {"type": "double_sparse", "channels_path": tmp_path / "ch.json",
                                            "label_bits": 4, "channels_key": "qk"}})
    assert cfg.selector.channels_path == str(tmp_path / "ch.json")  # a PathLike is stored as a str
    cfg.save(tmp_path / "c.json")
    back = TwilightConfig.load(tmp_path / "c.json")
    assert back.selector == cfg.selector and back.selector.label_bits == 4
