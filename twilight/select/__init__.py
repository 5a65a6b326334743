"""Select: coarse candidate sets, one `Selection` per decode step.

Every selector is a callable ``selector(q, cache, plan=None) -> Selection`` built by
``make_selector(cfg, layer_idx)``, with ``q [B, Hq, D]`` the step's queries, ``cache`` a ``LayerCache`` and
``plan`` the step's ``twilight.contract.StepPlan`` (``plan.host_reads`` false: output widths are host-known,
no count is read back from the device). Selections are per kv-head (``Selection.indices [B, Hkv, K]``); how a
kv-head's query heads share them is ``selector.gqa``:

- ``"group"`` (default): a token is a candidate for the whole group, scored by the largest score any query head
  of the group gives it, and ``token_budget`` counts tokens per kv-head.
- ``"head"`` (the original Twilight code's semantics: it repeats K/V per query head before selecting): each query
  head selects its own ``token_budget`` tokens by its own score; the ``Selection`` holds their union per kv-head
  (K/V are read once per kv-head) and ``Selection.head_mask`` says which of them each query head selected, so that
  each query head prunes and attends to its own selection only. ``full`` and ``streaming`` score nothing: their
  selection is the same for every query head in both modes (no ``head_mask``); ``h2o`` is ``"group"`` only.

- ``full``: every valid token.
- ``quest``: the pages with the highest upper bound of ``q·k`` (Quest), ``token_budget`` tokens in all
  (rounded up to whole pages); the most recent page, partial or not, is always among them, as Quest and the
  original Twilight code attend to the current page, and it comes last.
- ``streaming``: ``sink_tokens`` first tokens plus the ``window`` most recent (StreamingLLM).
- ``double_sparse``: top tokens by ``q·k`` over ``num_channels`` calibrated label channels per kv-head
  (Double Sparsity), read from ``channels_path`` (see ``twilight.select.double_sparse``); with
  ``label_bits`` the key labels are min-max quantized per token first, as the original code does.
- ``oracle_topk``: top tokens by exact ``q·k`` (research baseline; reads all of K).
- ``sparq``: top tokens by SparQ's approximate ``q·k``: each query head scores with its ``num_channels`` (``r``)
  channels of largest ``|q|``, scaled by ``1/sqrt(head_dim)`` (not ``1/sqrt(r)``), as SparQ does.
- ``tidal``: TidalDecode. The ``reselection_layers`` attend to every token and pick the top ``token_budget``
  tokens by exact ``q·k``; every later layer of the same step reuses that selection (handed over in the step's
  ``StepPlan.shared``); layers before the first re-selection layer attend to every token.
- ``snapkv``, ``h2o``: selectors that watch the prefill (``twilight.select.prefill``): SnapKV's prompt tokens
  voted by an observation window, H2O's heavy hitters by accumulated attention plus a recent window.

Under ``gqa="group"`` a token-level selector scores a token for a kv-head by the largest score any of its query
heads gives it (``sparq``, ``tidal``, ``oracle_topk``, ``double_sparse``): each query head's channels are its own.
Under ``gqa="head"`` each query head takes the top ``token_budget`` tokens (Quest: the top pages) of its own scores.
"""
from __future__ import annotations

import torch

from twilight._tensors import compact, compact_heads, group_queries, valid_positions
from twilight.cache import LayerCache, quantize_labels
from twilight.config import GQA_MODES, SELECTOR_TYPES, SelectorConfig
from twilight.selection import Selection

__all__ = ["make_selector", "quest_page_scores", "pages_with_tokens", "last_pages", "exact_group_scores",
           "exact_head_scores", "observation_key", "SELECTOR_TYPES"]


def _width(plan, n: int) -> int | None:
    """``compact``'s width: read from the counts (``None``) when the plan allows host reads, else ``n``."""
    return None if plan is None or plan.host_reads else n


def _full(q: torch.Tensor, cache: LayerCache, plan=None) -> Selection:
    start = cache.start if cache.max_start else None  # None: every row is [0, length), known on the host
    return Selection.full(cache.batch, cache.num_kv_heads, cache.length, device=cache.device, start=start)


def _head_selection(mask: torch.Tensor, plan, bound: int) -> Selection:
    """Per-query-head selections ``mask [B, Hkv, G, L]`` (each query head's positions) as a `Selection`: their
    union per kv-head, with ``head_mask``. ``bound``: an upper bound of a union's size (the host-known width)."""
    B, H, G, L = mask.shape
    pos = torch.arange(L, device=mask.device, dtype=torch.int32).expand(B, H, L)
    out, counts, head_mask = compact_heads(pos, mask, width=_width(plan, max(min(L, bound), 1)))
    return Selection(out, counts, head_mask=head_mask)


def _topk_tokens(scores: torch.Tensor, cache: LayerCache, budget: int, plan=None) -> Selection:
    """Top ``budget`` positions per kv-head from token scores ``[B, Hkv, L]`` (invalid positions -inf); from per
    query head scores ``[B, Hkv, G, L]`` (``gqa="head"``), each query head's own top ``budget``, as their union with
    ``head_mask``."""
    if budget >= cache.length:
        return _full(None, cache)
    if scores.dim() == 4 and scores.shape[2] == 1:  # one query head per kv-head: both modes are the same selection
        scores = scores.squeeze(2)
    if scores.dim() == 4:
        top = torch.topk(scores, budget, dim=-1, sorted=False)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(-1, top.indices, top.values > float("-inf"))  # invalid positions score -inf: never kept
        return _head_selection(mask, plan, scores.shape[2] * budget)
    idx = torch.topk(scores, budget, dim=-1, sorted=False).indices
    valid = valid_positions(cache, idx) & (scores.gather(-1, idx) > float("-inf"))
    out, counts = compact(idx, valid, width=budget)
    return Selection(out, counts)


def quest_page_scores(q: torch.Tensor, cache: LayerCache, per_head: bool = False) -> torch.Tensor:
    """Quest's upper bound of ``max over the group's query heads of q·k`` per page: ``[B, Hkv, pages]``; with
    ``per_head``, each query head's own bound of its ``q·k``: ``[B, Hkv, G, pages]`` (``gqa="head"``).

    For each channel, ``max(q_d * max_d, q_d * min_d) = relu(q_d) * max_d + min(q_d, 0) * min_d``, so the
    bound of all pages is one batched matmul of ``[max | min]`` with ``[relu(q) | min(q, 0)]``.
    Pages holding no valid token score ``-inf``.
    """
    qg = group_queries(q, cache)  # [B, Hkv, G, D]
    cache.update_derived()
    B, H, G, D = qg.shape
    P = cache.num_pages
    bounds = cache.page_bounds[:, :, :P].reshape(B * H, P, 2 * D)  # [max | min] per page
    # In float32 whatever the cache and bounds dtypes, q never rounded to the bounds': every backend computes these
    # same products (exact in float32) and sums, so they pick the same pages.
    qq = torch.cat([qg.clamp_min(0), qg.clamp_max(0)], -1).reshape(B * H, G, 2 * D).float()
    # [G, 2D] @ [2D, P] (pages as the wide dimension) runs ~2x faster on CPU than [P, 2D] @ [2D, G]
    scores = torch.bmm(qq, bounds.float().transpose(1, 2)).view(B, H, G, P)
    if not per_head:
        scores = scores.amax(2)  # [B, Hkv, P]
    if cache.max_start == 0:  # no padding: every page up to the last holds valid tokens
        return scores
    empty = ~pages_with_tokens(cache)  # [B, P]
    return scores.masked_fill(empty.view(B, 1, 1, P) if per_head else empty.unsqueeze(1), float("-inf"))


def pages_with_tokens(cache: LayerCache) -> torch.Tensor:
    """``[B, pages]`` bool: which of each sequence's pages (cut from its first valid token, ``cache.page_offset``)
    hold a valid token. Left padding fills the pages before ``start // page_size``; a sequence whose grid is
    offset may end one page before the others."""
    ps = cache.page_size
    page = torch.arange(cache.num_pages, device=cache.device).view(1, -1)
    return (page >= (cache.start // ps).view(-1, 1)) & (page * ps + cache.page_offset.view(-1, 1) < cache.length)


def last_pages(cache: LayerCache) -> torch.Tensor:
    """``[B]`` int64: each sequence's most recent page (the one holding position ``length - 1``)."""
    return (cache.length - 1 - cache.page_offset.long()).div(cache.page_size, rounding_mode="floor")


class _Quest:
    def __init__(self, cfg: SelectorConfig):
        self.budget, self.page_size, self.gqa = cfg.token_budget, cfg.page_size, cfg.gqa
        # Backends with a fused Quest kernel (which selects per kv-head) recognise it by "quest"; the per query head
        # selection has another kind, so that no kernel takes it for the one it implements.
        self.kind = "quest" if cfg.gqa == "group" else "quest-per-head"

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan=None, page_scores=quest_page_scores) -> Selection:
        """``page_scores(q, cache) -> [B, Hkv, pages]``: the page bounds' scores (a backend passes its own kernel
        for ``quest_page_scores``; the rest of the selection is the same for every backend that uses this)."""
        if cache.page_size != self.page_size:
            raise ValueError(f"selector.page_size={self.page_size} differs from the cache's "
                             f"page_size={cache.page_size}")
        if cache.length - cache.min_start <= self.budget:
            return _full(q, cache)
        ps = self.page_size
        n_pages = min(-(-self.budget // ps), cache.num_pages)
        if self.gqa == "head" and q.shape[1] > cache.num_kv_heads:  # (one query head per kv-head: the same)
            return self._per_head(q, cache, n_pages, plan)
        tile = torch.arange(ps, device=q.device, dtype=torch.int32)
        if cache.max_start == 0:  # no padding: pages at multiples of ps, the valid tokens a prefix of the row
            last = cache.num_pages - 1  # the most recent page: always kept, and last
            scores = page_scores(q, cache)[..., :last]  # [B, Hkv, P - 1]
            pages = torch.topk(scores, n_pages - 1, dim=-1, sorted=False).indices.to(torch.int32)
            pages = torch.cat([pages, pages.new_full((*pages.shape[:2], 1), last)], -1)  # [B, Hkv, n_pages]
            tokens = (pages.unsqueeze(-1) * ps + tile).flatten(-2)
            n = (n_pages - 1) * ps + cache.length - last * ps
            counts = torch.full(pages.shape[:2], n, dtype=torch.int32, device=q.device)
            return Selection(tokens.contiguous(), counts, page_size=ps, uniform_count=n)
        # Left padding: each sequence's pages start at its first valid token (cache.page_offset), so its last page
        # is its own; pages holding no valid token score -inf and are taken only when a sequence has fewer valid
        # pages than the budget (their positions are dropped below).
        B, H = cache.batch, cache.num_kv_heads
        last = last_pages(cache).view(B, 1, 1).expand(B, H, 1)
        scores = page_scores(q, cache).scatter(-1, last, float("-inf"))  # the last page does not compete
        pages = torch.topk(scores, n_pages - 1, dim=-1, sorted=False).indices
        pages = pages.masked_fill(pages == last, cache.num_pages)  # a -inf tie: a page past the end, dropped below
        pages = torch.cat([pages, last], -1).to(torch.int32)  # [B, Hkv, n_pages], the last page last
        offset = cache.page_offset.view(B, 1, 1, 1)
        tokens = (pages.unsqueeze(-1) * ps + offset + tile).flatten(-2)
        out, counts = compact(tokens, valid_positions(cache, tokens), width=_width(plan, tokens.shape[-1]))
        return Selection(out, counts)

    def _per_head(self, q: torch.Tensor, cache: LayerCache, n_pages: int, plan) -> Selection:
        """``gqa="head"``: each query head's own ``n_pages`` pages (its last page and the ``n_pages - 1`` others of
        highest bound of its own ``q·k``), as their union per kv-head with ``head_mask``."""
        scores = quest_page_scores(q, cache, per_head=True)  # [B, Hkv, G, P]
        B, H, G, P = scores.shape
        ps, L = self.page_size, cache.length
        last = last_pages(cache).view(B, 1, 1, 1).expand(B, H, G, 1)
        scores = scores.scatter(-1, last, float("-inf"))  # the last page does not compete: it is always kept
        top = torch.topk(scores, n_pages - 1, dim=-1, sorted=False)
        chosen = torch.zeros(B, H, G, P, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, top.indices, top.values > float("-inf"))  # pages without a valid token: never
        chosen.scatter_(-1, last, True)
        pos = torch.arange(L, device=q.device)
        page = (pos.view(1, L) - cache.page_offset.view(B, 1).long()).div(ps, rounding_mode="floor")  # [B, L]
        mask = chosen.gather(-1, page.clamp(0, P - 1).view(B, 1, 1, L).expand(B, H, G, L))
        mask &= valid_positions(cache, pos.view(1, 1, L)).unsqueeze(2)
        return _head_selection(mask, plan, G * n_pages * ps)


class _Streaming:
    def __init__(self, cfg: SelectorConfig):
        self.sinks, self.window = cfg.sink_tokens, cfg.window

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan=None) -> Selection:
        B, H, L = cache.batch, cache.num_kv_heads, cache.length
        pos = torch.arange(L, device=cache.device).view(1, 1, L)
        start = cache.start.view(-1, 1, 1)
        if self.sinks + self.window >= L:
            return _full(q, cache)
        keep = ((pos < start + self.sinks) | (pos >= L - self.window)) & (pos >= start)
        out, counts = compact(pos.expand(B, 1, L), keep, width=_width(plan, min(L, self.sinks + self.window)))
        return Selection(out.expand(B, H, -1).contiguous(), counts.expand(B, H).contiguous())


def _masked(scores: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Token scores ``[B, Hkv, L]`` (or ``[B, Hkv, G, L]``) with positions outside each sequence's valid range at
    ``-inf``."""
    pos = torch.arange(cache.length, device=scores.device).view(1, 1, -1)
    valid = valid_positions(cache, pos)  # [B, 1, L]
    return scores.masked_fill(~(valid.unsqueeze(2) if scores.dim() == 4 else valid), float("-inf"))


def _group_or_heads(scores: torch.Tensor, gqa: str) -> torch.Tensor:
    """Per query head scores ``[B, Hkv, G, L]``: as they are (``gqa="head"``), or the group's max ``[B, Hkv, L]``."""
    return scores if gqa == "head" else scores.amax(2)


def exact_head_scores(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Each query head's exact ``q·k``: ``[B, Hkv, G, L]`` float32, ``-inf`` off range."""
    qg = group_queries(q, cache).float()
    return _masked(torch.einsum("bhgd,bhld->bhgl", qg, cache.keys().float()), cache)


def exact_group_scores(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """max over each kv-head's query heads of the exact ``q·k``: ``[B, Hkv, L]`` float32, ``-inf`` off range."""
    qg = group_queries(q, cache).float()
    return _masked(torch.einsum("bhgd,bhld->bhgl", qg, cache.keys().float()).amax(2), cache)


class _OracleTopK:
    def __init__(self, cfg: SelectorConfig):
        self.budget, self.gqa = cfg.token_budget, cfg.gqa

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan=None) -> Selection:
        scores = exact_head_scores(q, cache) if self.gqa == "head" else exact_group_scores(q, cache)
        return _topk_tokens(scores, cache, self.budget, plan)


class _SparQ:
    def __init__(self, cfg: SelectorConfig):
        self.budget, self.r, self.gqa = cfg.token_budget, cfg.num_channels, cfg.gqa

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan=None) -> Selection:
        qg = group_queries(q, cache).float()  # [B, Hkv, G, D]
        B, H, G, D = qg.shape
        if self.r > D:
            raise ValueError(f"selector.num_channels={self.r} is invalid for sparq: must be <= head_dim={D}")
        if cache.length - cache.min_start <= self.budget:
            return _full(q, cache)
        channels = qg.abs().topk(self.r, dim=-1).indices  # [B, Hkv, G, r]: each query head's own channels
        q_r = qg.gather(-1, channels)
        L = cache.length
        k_r = cache.keys().unsqueeze(2).expand(B, H, G, L, D).gather(
            -1, channels.unsqueeze(3).expand(B, H, G, L, self.r)).float()  # [B, Hkv, G, L, r]: r channels, then f32
        scores = _group_or_heads(torch.einsum("bhgr,bhglr->bhgl", q_r, k_r), self.gqa) * D ** -0.5
        return _topk_tokens(_masked(scores, cache), cache, self.budget, plan)


class _Tidal:
    """TidalDecode's position-persistent selection: one per ``layer_idx`` (see the module docstring)."""

    SHARED_KEY = "tidal"

    def __init__(self, cfg: SelectorConfig, layer_idx: int, reselection_layers: list[int]):
        self.budget, self.layer_idx, self.gqa = cfg.token_budget, layer_idx, cfg.gqa
        self.reselects = layer_idx in reselection_layers
        self.before_first = layer_idx < min(reselection_layers)

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan=None) -> Selection:
        if self.reselects:
            if plan is None:
                raise ValueError("tidal needs the step's plan (TwilightPipeline.plan) to hand its selection to "
                                 "the following layers")
            scores = exact_head_scores(q, cache) if self.gqa == "head" else exact_group_scores(q, cache)
            sel = _topk_tokens(scores, cache, self.budget, plan)
            plan.shared[self.SHARED_KEY] = (sel, cache.min_start, cache.max_start)
            return _full(q, cache)
        if self.before_first:
            return _full(q, cache)
        shared = None if plan is None else plan.shared.get(self.SHARED_KEY)
        if shared is None:
            raise ValueError(f"tidal: layer {self.layer_idx} reuses the tokens of the last re-selection layer, which "
                             "did not run with this step's plan: pass the same plan (TwilightPipeline.plan(cache)) to "
                             "every layer of a decode step, in layer order")
        sel, min_start, max_start = shared
        if sel.indices.device != q.device:
            sel = Selection(sel.indices.to(q.device), sel.counts.to(q.device),
                            head_mask=None if sel.head_mask is None else sel.head_mask.to(q.device))
        if (min_start, max_start) != (cache.min_start, cache.max_start):  # a sliding-window layer: stay inside it
            keep = sel.valid() & valid_positions(cache, sel.indices)
            if sel.head_mask is None:
                sel = Selection(*compact(sel.indices, keep, width=_width(plan, sel.k_max)))
            else:
                out, counts, head_mask = compact_heads(sel.indices, sel.head_mask & keep.unsqueeze(2),
                                                       width=_width(plan, sel.k_max))
                sel = Selection(out, counts, head_mask=head_mask)
        return sel


class _DoubleSparse:
    def __init__(self, cfg: SelectorConfig, layer_idx: int):
        from twilight.select.double_sparse import load_channels

        self.budget, self.label_bits, self.gqa = cfg.token_budget, cfg.label_bits, cfg.gqa
        self.channels = load_channels(cfg.channels_path, layer_idx, cfg.num_channels, cfg.channels_key)  # [Hkv, C]

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan=None) -> Selection:
        if cache.label_channels is None:
            raise ValueError("double_sparse needs a cache built with label_channels (the calibrated channels)")
        qg = group_queries(q, cache)
        ch = cache.label_channels.to(q.device)
        q_label = torch.gather(qg, 3, ch.view(1, ch.shape[0], 1, -1).expand(qg.shape[0], -1, qg.shape[2], -1))
        k_label = cache.k_label[:, :, :cache.length]
        if cache.label_bits != self.label_bits:
            if cache.label_bits is not None:
                raise ValueError(f"selector.label_bits={self.label_bits} differs from the cache's "
                                 f"label_bits={cache.label_bits}")
            k_label = quantize_labels(k_label, self.label_bits)  # a cache that keeps exact labels
        scores = _group_or_heads(torch.einsum("bhgc,bhlc->bhgl", q_label.float(), k_label.float()), self.gqa)
        return _topk_tokens(_masked(scores, cache), cache, self.budget, plan)


def make_selector(cfg: SelectorConfig, layer_idx: int = 0, num_layers: int | None = None):
    """The selector callable for ``cfg`` (``layer_idx`` picks double_sparse's calibrated channels and tidal's role;
    tidal's default re-selection layers depend on ``num_layers``)."""
    if cfg.gqa not in GQA_MODES:  # a SelectorConfig built without validation: never run a mode it did not ask for
        raise ValueError(f"selector.gqa={cfg.gqa!r} is invalid: must be one of {', '.join(GQA_MODES)}")
    if cfg.type == "full":
        return _full
    if cfg.type == "quest":
        return _Quest(cfg)
    if cfg.type == "streaming":
        return _Streaming(cfg)
    if cfg.type == "oracle_topk":
        return _OracleTopK(cfg)
    if cfg.type == "double_sparse":
        return _DoubleSparse(cfg, layer_idx)
    if cfg.type == "sparq":
        return _SparQ(cfg)
    if cfg.type == "tidal":
        if cfg.reselection_layers is None and num_layers is None:
            raise ValueError("tidal's default re-selection layers depend on the model's depth: pass num_layers or "
                             "set selector.reselection_layers")
        return _Tidal(cfg, layer_idx, cfg.default_reselection_layers(num_layers or 0))
    if cfg.type in ("snapkv", "h2o"):
        from twilight.select.prefill import H2O, SnapKV

        return SnapKV(cfg) if cfg.type == "snapkv" else H2O(cfg)
    raise ValueError(f"selector.type={cfg.type!r} is invalid: must be one of {', '.join(SELECTOR_TYPES)}")


def observation_key(config) -> tuple | None:
    """What a ``TwilightConfig``'s selector records while watching a prompt (``None``: nothing). Configs with equal
    keys can decode from one prefilled cache (``twilight.integrations.hf.fork_cache``); budgets may differ."""
    sel = config.selector
    if config.is_dense or sel.type not in ("snapkv", "h2o"):
        return None
    window = sel.observation_window if sel.type == "snapkv" else None
    return sel.type, window, tuple(sorted(config.dense_layers))


def selector_channels(cfg: SelectorConfig, layer_idx: int, num_kv_heads: int | None = None) -> torch.Tensor | None:
    """The label channels ``[Hkv, num_channels]`` a cache must keep for ``cfg`` (double_sparse only).

    Read from ``cfg.channels_path`` (``cfg.channels_key`` picks a DoubleSparse file's projection); with
    ``num_kv_heads`` the file must have one row per kv-head. The cache's ``label_bits`` should be
    ``cfg.label_bits``.
    """
    if cfg.type != "double_sparse":
        return None
    from twilight.select.double_sparse import load_channels

    return load_channels(cfg.channels_path, layer_idx, cfg.num_channels, cfg.channels_key, num_kv_heads)
