"""Selectors that watch the prefill: SnapKV and H2O, as selections over the whole cache (nothing is evicted).

Both see the queries of every multi-token forward through ``observe(q, cache, scale)`` (a patched model calls
``TwilightPipeline.observe`` from its attention function; the K/V of those tokens are already in ``cache``) and
keep what they learn in ``cache.observations``, so that a prefilled cache can be forked into another
configuration (``twilight.integrations.hf.fork_cache``) without running the prompt again. What they derive per
decode step lives in ``cache.selector_state``.

- ``snapkv`` (SnapKV): the queries of the last ``observation_window`` prompt tokens vote for the earlier prompt
  tokens with their attention (softmax over the prompt, causal; summed over the window and over the kv-head's
  query heads), the votes are pooled along the positions (``pooling`` over ``kernel_size``), and the
  ``token_budget - observation_window`` best-voted prompt tokens are kept with the window itself. Decode steps
  attend to the kept prompt tokens plus every token generated since: the selection is made once per prompt.
  Under ``gqa="head"`` (as the original Twilight code's SnapKV, which compresses each query head's repeated K/V)
  each query head votes with its own window queries and keeps its own prompt tokens; the kv-head reads the union.
- ``h2o`` (H2O): each token's accumulated attention, summed over the kv-head's query heads: from every prompt
  query (causal softmax over the prompt) and then, each decode step, from the step's queries over the tokens
  selected (H2O's attention over its retained cache). A step selects the ``recent_tokens`` most recent tokens and
  the ``token_budget - recent_tokens`` other tokens of highest accumulated attention. ``gqa="group"`` only.

Left padding: padded positions are never voted for, never selected, and their queries cast no votes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from twilight._tensors import compact, compact_heads, gather_tokens, group_queries, valid_positions
from twilight.cache import LayerCache
from twilight.config import POOLINGS, SelectorConfig, _check_int, _fail
from twilight.contract import StepPlan
from twilight.select.base import _width
from twilight.select.registry import SelectorSpec, register_selector
from twilight.selection import Selection

__all__ = ["SnapKV", "H2O", "prompt_attention"]

_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of prompt queries (64 MiB of float32)


def _check_prefill_q(q: torch.Tensor, cache: LayerCache) -> None:
    if q.dim() != 4 or q.shape[0] != cache.batch or q.shape[1] % cache.num_kv_heads or q.shape[3] != cache.head_dim:
        raise ValueError(f"prefill queries must be [B={cache.batch}, Hq (a multiple of Hkv={cache.num_kv_heads}), "
                         f"T, D={cache.head_dim}], got {tuple(q.shape)}")
    if q.shape[2] > cache.length:
        raise ValueError(f"{q.shape[2]} prefill queries but the cache holds {cache.length} tokens: append their K/V "
                         "first")


def prompt_attention(q: torch.Tensor, cache: LayerCache, scale: float, per_head: bool = False) -> torch.Tensor:
    """The causal attention of the last ``T`` tokens' queries ``q [B, Hq, T, D]`` over the cache's first
    ``length`` tokens, summed over the queries and over each kv-head's query heads: ``[B, Hkv, length]`` float32
    (``per_head``: summed over the queries only, ``[B, Hkv, G, length]``).

    Query ``t`` sits at position ``length - T + t`` and attends to the valid positions up to its own; a query at a
    padded position casts no weight."""
    B, Hq, T, D = q.shape
    H, L = cache.num_kv_heads, cache.length
    G = Hq // H
    k = cache.keys().float().reshape(B * H, L, D)
    qf = q.float().reshape(B * H, G * T, D)  # [B, Hkv, G, T, D] rows
    logits = torch.bmm(qf, k.transpose(1, 2)).mul_(scale).view(B, H, G, T, L)
    qpos = torch.arange(L - T, L, device=q.device).view(T, 1)
    if cache.max_start:  # left padding: padded keys get no weight, padded queries cast none
        kpos = torch.arange(L, device=q.device).view(1, L)
        allowed = (kpos <= qpos).view(1, 1, 1, T, L) & (kpos >= cache.start.view(B, 1, 1, 1, 1))
        probs = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), -1).nan_to_num_(0.0)
    else:  # only the last T keys can lie after a query
        kpos = torch.arange(L - T, L, device=q.device).view(1, T)
        logits[..., L - T:].masked_fill_((kpos > qpos).view(1, 1, 1, T, T), float("-inf"))
        probs = torch.softmax(logits, -1)
    if per_head:
        return probs.sum(3)
    return probs.view(B, H, G * T, L).sum(2)


class SnapKV:

    def __init__(self, cfg: SelectorConfig):
        self.budget, self.window = cfg.token_budget, cfg.observation_window
        self.kernel, self.pooling, self.gqa = cfg.kernel_size, cfg.pooling, cfg.gqa

    def observe(self, q: torch.Tensor, cache: LayerCache, scale: float) -> None:
        """Keep the last ``observation_window`` queries seen (this chunk's, after earlier chunks')."""
        _check_prefill_q(q, cache)
        obs = cache.observations
        key, length_key = f"snapkv_queries_{self.window}", f"snapkv_length_{self.window}"
        if obs.get(length_key) == cache.length:
            return  # seen already (by another observer of the same prefill)
        seen = obs.get(key)
        if seen is not None and obs.get(length_key) == cache.length - q.shape[2]:
            q = torch.cat([seen.to(q.device, q.dtype), q], 2)  # a chunked prefill: the window may span chunks
        obs[key], obs[length_key] = q[:, :, -self.window:].detach().clone(), cache.length
        obs["scale"] = scale
        cache.selector_state.clear()

    def prompt_tokens(self, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept prompt positions ``[B, Hkv, K]`` and which of them are valid (``gqa="head"``: which of them each
        query head keeps, ``[B, Hkv, G, K]``), made once per prompt."""
        obs = cache.observations
        P = obs.get(f"snapkv_length_{self.window}")
        if P is None:
            raise ValueError("snapkv chooses prompt tokens with the prompt's last queries, and this cache saw no "
                             "prefill: a patched model records them; with a TwilightPipeline, call "
                             "pipeline.observe(layer_idx, q, cache, scale) with the prompt's queries (a cache "
                             "forked from a prefill observed for another observation_window lacks them too)")
        key = ("snapkv", P, self.window, self.budget, self.gqa)
        if key not in cache.selector_state:
            cache.selector_state[key] = self._vote(cache, obs[f"snapkv_queries_{self.window}"], P, obs["scale"])
        return cache.selector_state[key]

    def _vote(self, cache: LayerCache, qw: torch.Tensor, P: int, scale: float):
        B, H, dev = cache.batch, cache.num_kv_heads, cache.device
        W = qw.shape[2]
        window = torch.arange(P - W, P, device=dev).expand(B, H, W)
        G = qw.shape[1] // H
        per_head = self.gqa == "head" and G > 1  # (one query head per kv-head: both modes are the same)
        if P - cache.min_start <= self.budget or P - W <= 0:  # every prompt token fits
            prompt = torch.arange(P, device=dev).expand(B, H, P)
            valid = valid_positions(cache, prompt)
            return prompt, valid.unsqueeze(2).expand(B, H, G, P) if per_head else valid
        view = _Prefix(cache, P)
        votes = prompt_attention(qw.to(dev), view, scale, per_head)[..., :P - W]  # [B, Hkv, (G,) P - W]
        lead = votes.shape[:-1]
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(votes.reshape(-1, 1, P - W), self.kernel, stride=1, padding=self.kernel // 2).view(*lead, -1)
        pos = torch.arange(P - W, device=dev)
        padded = pos < cache.start.view(-1, 1)  # [B, P - W]
        pooled = pooled.masked_fill(padded.view(B, 1, 1, -1) if per_head else padded.view(B, 1, -1), float("-inf"))
        n = min(self.budget - W, P - W)
        top = pooled.topk(n, dim=-1, sorted=False)
        if per_head:  # each query head's own prompt tokens, and the window, over the prompt's positions
            chosen = torch.zeros(B, H, G, P, dtype=torch.bool, device=dev)
            chosen.scatter_(-1, top.indices, top.values > float("-inf"))
            chosen[..., P - W:] = valid_positions(cache, window).unsqueeze(2)
            return torch.arange(P, device=dev).expand(B, H, P), chosen
        keep = torch.cat([top.indices, window], -1)
        valid = torch.cat([top.values > float("-inf"), valid_positions(cache, window)], -1)
        return keep, valid

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        group_queries(q, cache)  # checks q
        keep, valid = self.prompt_tokens(cache)
        P, L = cache.observations[f"snapkv_length_{self.window}"], cache.length
        B, H = cache.batch, cache.num_kv_heads
        generated = torch.arange(P, L, device=cache.device).expand(B, H, L - P)
        indices = torch.cat([keep.to(torch.int64), generated], -1)
        if valid.dim() == 4:  # gqa="head": each query head its own prompt tokens, every head the generated ones
            G = valid.shape[2]
            heads = torch.cat([valid, torch.ones(B, H, G, L - P, dtype=torch.bool, device=cache.device)], -1)
            out, counts, head_mask = compact_heads(indices, heads, width=_width(plan, indices.shape[-1]))
            return Selection(out, counts, head_mask=head_mask)
        keep_mask = torch.cat([valid, torch.ones_like(generated, dtype=torch.bool)], -1)
        out, counts = compact(indices, keep_mask, width=_width(plan, indices.shape[-1]))
        return Selection(out, counts)


class _Prefix:
    """The first ``length`` positions of a cache, as ``prompt_attention`` reads it."""

    def __init__(self, cache: LayerCache, length: int):
        self.num_kv_heads, self.length, self.start = cache.num_kv_heads, length, cache.start
        self.max_start = cache.max_start
        self._k = cache.k[:, :, :length]

    def keys(self) -> torch.Tensor:
        return self._k


class H2O:

    def __init__(self, cfg: SelectorConfig):
        if cfg.gqa != "group":
            raise ValueError(f"selector.gqa={cfg.gqa!r} is invalid for h2o: it implements 'group' only")
        self.budget, self.recent = cfg.token_budget, cfg.h2o_recent

    def observe(self, q: torch.Tensor, cache: LayerCache, scale: float) -> None:
        """Add the attention each token receives from ``q``'s tokens (the last ``T`` in the cache)."""
        _check_prefill_q(q, cache)
        obs = cache.observations
        if obs.get("h2o_length") == cache.length:
            return  # these tokens were counted already (by another observer of the same prefill)
        # after decode steps (a second turn), go on from the scores they accumulated
        acc = self._extend(cache.selector_state.get("h2o", obs.get("h2o_scores")), cache)
        B, Hq, T, D = q.shape
        step = max(1, _CHUNK_ELEMENTS // (B * Hq * cache.length))
        for t0 in range(0, T, step):  # query chunks, each attending causally to everything before it
            t1 = min(T, t0 + step)
            view = _Prefix(cache, cache.length - (T - t1))
            acc[..., :view.length] += prompt_attention(q[:, :, t0:t1], view, scale)
        obs["h2o_scores"], obs["h2o_length"] = acc, cache.length
        obs["scale"] = scale
        cache.selector_state.clear()

    @staticmethod
    def _extend(acc: torch.Tensor | None, cache: LayerCache) -> torch.Tensor:
        """``acc [B, Hkv, n]`` zero-extended to the cache's length (a new copy when it grows)."""
        B, H, L = cache.batch, cache.num_kv_heads, cache.length
        if acc is None:
            return torch.zeros(B, H, L, device=cache.device)
        if acc.shape[-1] < L:
            acc = torch.cat([acc, acc.new_zeros(B, H, L - acc.shape[-1])], -1)
        return acc

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        qg = group_queries(q, cache).float()  # [B, Hkv, G, D]
        state = cache.selector_state
        acc = state.get("h2o")
        if acc is None:
            seen = cache.observations.get("h2o_scores")
            if seen is None and cache.length - cache.min_start > 1:  # a prompt no one scored: refuse, not guess
                raise ValueError("h2o keeps the prompt's heavy hitters by their accumulated attention, and this cache "
                                 "saw no prefill: a patched model records it; with a TwilightPipeline, call "
                                 "pipeline.observe(layer_idx, q, cache, scale) with the prompt's queries (or make the "
                                 "cache with make_cache(model, observe_for=[this config]) before forking it)")
            acc = None if seen is None else seen.clone()
        acc = self._extend(acc, cache)
        scale = plan.scale if plan.scale is not None else \
            cache.observations.get("scale", q.shape[-1] ** -0.5)
        B, H, L = cache.batch, cache.num_kv_heads, cache.length
        if L - cache.min_start <= self.budget:
            indices = torch.arange(L, device=cache.device).expand(B, H, L)
            keep = valid_positions(cache, indices)
        else:
            recent = torch.arange(L - self.recent, L, device=cache.device).expand(B, H, self.recent)
            scores = acc.clone()
            scores[..., L - self.recent:] = float("-inf")
            pos = torch.arange(L, device=cache.device).view(1, 1, -1)
            scores = scores.masked_fill(pos < cache.start.view(-1, 1, 1), float("-inf"))
            heavy = scores.topk(self.budget - self.recent, dim=-1, sorted=False)
            indices = torch.cat([heavy.indices, recent], -1)
            keep = torch.cat([heavy.values > float("-inf"), valid_positions(cache, recent)], -1)
        out, counts = compact(indices, keep, width=_width(plan, indices.shape[-1]))
        sel = Selection(out, counts)
        # H2O's accumulation: this step's attention over the selected tokens (its retained cache)
        idx = out.long()
        k = gather_tokens(cache.k, out).float()  # [B, Hkv, K, D]: only the selected keys, then float32
        logits = torch.einsum("bhgd,bhkd->bhgk", qg, k) * scale
        logits = logits.masked_fill(~sel.valid().unsqueeze(2), float("-inf"))
        weights = torch.softmax(logits, -1).nan_to_num_(0.0).sum(2)  # [B, Hkv, K]
        state["h2o"] = acc.scatter_add_(-1, idx, weights)
        return sel


def _snapkv_fields(cfg: SelectorConfig) -> None:
    _check_int("selector.observation_window", cfg.observation_window, 1)
    _check_int("selector.kernel_size", cfg.kernel_size, 1)
    if cfg.kernel_size % 2 == 0:
        _fail("selector.kernel_size", cfg.kernel_size, "must be odd (the pooled votes keep the prompt's length)")
    if cfg.pooling not in POOLINGS:
        _fail("selector.pooling", cfg.pooling, f"must be one of {', '.join(POOLINGS)}")


def _snapkv_validate(cfg: SelectorConfig) -> None:
    if cfg.token_budget < cfg.observation_window:
        _fail("selector.token_budget", cfg.token_budget, f"snapkv keeps the observation window, so the budget "
              f"must be >= selector.observation_window={cfg.observation_window}")


def _h2o_fields(cfg: SelectorConfig) -> None:
    if cfg.recent_tokens is not None:
        _check_int("selector.recent_tokens", cfg.recent_tokens, 0)
        if cfg.recent_tokens > cfg.token_budget:
            _fail("selector.recent_tokens", cfg.recent_tokens,
                  f"must be <= selector.token_budget={cfg.token_budget} (h2o's recent window is part of it)")


register_selector(SelectorSpec(
    name="snapkv", build=lambda cfg, layer_idx=0, num_layers=None: SnapKV(cfg),
    picks="prompt tokens voted by the attention of the prompt's last `observation_window` queries, pooled, plus "
          "every generated token (SnapKV, as a selection: nothing is evicted)",
    gqa="both", fields=("observation_window", "kernel_size", "pooling"),
    fields_doc="`observation_window` (32), `kernel_size` (7), `pooling` (`avgpool`, `maxpool`)",
    check_fields=_snapkv_fields, validate=_snapkv_validate, legacy_names=("snap_kv",),
    observes=lambda cfg: cfg.observation_window))
register_selector(SelectorSpec(
    name="h2o", build=lambda cfg, layer_idx=0, num_layers=None: H2O(cfg),
    picks="heavy hitters by attention accumulated over the prompt and every decode step, plus a recent window "
          "(H2O, as a selection)",
    gqa="group", fields=("recent_tokens",), fields_doc="`recent_tokens` (default half the budget)",
    check_fields=_h2o_fields, observes=lambda cfg: None))
