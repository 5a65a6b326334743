"""Twilight: adaptive sparse attention for long-context decoding by hierarchical top-p pruning.

One line patches a Hugging Face model; from then on every decode step attends only to the tokens
that matter::

    import twilight
    twilight.patch(model, "quest-twilight")
    out = model.generate(**inputs, max_new_tokens=64)
    print(twilight.budget_stats(model).summary())
    twilight.unpatch(model)

See ``TwilightPipeline`` for the stages and ``TwilightConfig`` for the settings.
"""
from twilight.backends import BackendUnavailableError, available_backends
from twilight.cache import LayerCache
from twilight.config import PRESETS, ConfigError, TwilightConfig
from twilight.pipeline import TwilightPipeline
from twilight.selection import Selection
from twilight.stats import BudgetStats

__version__ = "0.1.0"
__all__ = [
    "TwilightConfig", "ConfigError", "PRESETS", "LayerCache", "Selection", "TwilightPipeline", "BudgetStats",
    "BackendUnavailableError", "available_backends", "patch", "unpatch", "budget_stats", "load_default_model",
    "DEFAULT_MODEL_ID",
]


def __getattr__(name):  # the HF integration imports transformers: load it on first use
    if name in ("patch", "unpatch", "budget_stats"):
        from twilight.integrations import hf

        return getattr(hf, name)
    if name in ("load_default_model", "DEFAULT_MODEL_ID"):
        from twilight import models

        return getattr(models, name)
    raise AttributeError(f"module 'twilight' has no attribute {name!r}")
