"""One-line patching of Hugging Face causal LMs: prefill dense, every decode step through Twilight.

::

    import twilight
    twilight.patch(model, "quest-twilight")        # preset name, JSON path, dict or TwilightConfig
    out = model.generate(**inputs, max_new_tokens=32)
    print(twilight.budget_stats(model).summary())
    twilight.unpatch(model)                        # the model is exactly as before

One concern per module:

- ``compat``: everything read from transformers' internals, with the releases it was checked against;
- ``cache``: ``TwilightCache``, the transformers ``Cache`` that holds Twilight's per-layer ``LayerCache``;
- ``attention``: the attention function registered in transformers' ``AttentionInterface``;
- ``patching``: ``patch`` / ``unpatch`` / ``budget_stats`` / ``gather_budget_stats`` and the guard against running
  dense in silence;
- ``distributed``: tensor parallelism (each rank runs Twilight on its own heads; ``gather_stats`` joins the ranks').
"""
from twilight.integrations.hf.attention import TwilightNotEngagedError
from twilight.integrations.hf.cache import TwilightCache, TwilightLayer
from twilight.integrations.hf.compat import (
    SUPPORTED_TRANSFORMERS,
    UnsupportedTransformersError,
    check_transformers_version,
    output_cache,
)
from twilight.integrations.hf.patching import (
    SUPPORTED_MODEL_TYPES,
    budget_stats,
    bypassed_steps,
    check_supported,
    engagement,
    fork_cache,
    gather_budget_stats,
    is_patched,
    make_cache,
    patch,
    unpatch,
)

__all__ = ["patch", "unpatch", "budget_stats", "is_patched", "make_cache", "fork_cache", "check_supported",
           "engagement",
           "bypassed_steps", "output_cache", "gather_budget_stats", "TwilightCache", "TwilightLayer",
           "TwilightNotEngagedError", "UnsupportedTransformersError", "SUPPORTED_MODEL_TYPES", "SUPPORTED_TRANSFORMERS",
           "check_transformers_version"]
