"""Realistic attention for benchmarking the pruner.

Random keys give nearly flat attention, where top-p keeps almost every candidate and the pruner's cost
and benefit both look wrong. Two sources of realistic queries and keys:

- ``SyntheticProfile`` (always available): keys are Gaussian noise plus, for every query head, a set of
  "hot" tokens aligned with that head's query. Hot-set sizes per head follow a truncated power law over
  ``[min_hot, max_hot]`` (exponent ``exponent``; 1 would be log-uniform), laid out on a quantile grid so
  that every layer holds the same spread of peaked and flat heads. The hot tokens of a head hold
  ``hot_mass`` of its softmax mass, so oracle top-p at ``p < hot_mass`` keeps about the hot set. The
  defaults reproduce what SmolLM2-135M shows at 4.4k context (oracle top-p at p = 0.85 keeps 1 to ~2,000
  tokens per head, ~90 on average; see ``python -m twilight_bench.profiles``). With log-uniform sizes
  (exponent 1) the mean would be ~260, three times the measured mean, hence the steeper default.
  Hot-set sizes scale with the context as ``(length / ref_length) ** growth``.
- ``ReplayProfile``: real post-RoPE queries, keys and values of the embedded model (SmolLM2-135M, head
  shape 9/3/64) captured on a long prompt (``capture_replay``) and extended to longer contexts by tiling
  the middle of the context (the first ``sink`` and last ``recent`` tokens appear once).

Both give ``query() -> [B, Hq, D]`` and ``chunks() -> iterator of (k, v) [B, Hkv, n, D]`` that fill a
``LayerCache`` in order without materialising the whole context twice. ``oracle_top_p_budgets`` measures
what exact top-p keeps (sort-based, on the exact softmax), to check a profile and to report next to the
benchmarked budgets.

Example::

    >>> prof = SyntheticProfile(batch=1, num_q_heads=4, num_kv_heads=2, head_dim=64, length=2048)
    >>> k, v = prof.keys_values()
    >>> counts = oracle_top_p_budgets(prof.query(), k, 64 ** -0.5, 0.85)  # [1, 4]
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

REF_LENGTH = 4400  # context length of the measured reference budgets (SmolLM2-135M, p = 0.85)


# ---------------------------------------------------------------------- oracle budgets
def oracle_top_p_budgets(q: torch.Tensor, keys: torch.Tensor, scale: float, p: float,
                         lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens exact top-p keeps per query head: ``[B, Hq]`` int64.

    Sort-based reference: softmax of the exact ``q·k * scale`` (float32), sorted descending; the count is
    the smallest ``n`` whose top-``n`` mass reaches ``p``.

    Args:
        q: ``[B, Hq, D]``; keys: ``[B, Hkv, L, D]`` (GQA: Hq a multiple of Hkv); p in (0, 1].
    """
    B, Hq, D = q.shape
    Hkv = keys.shape[1]
    out = torch.empty(B, Hq, dtype=torch.long)
    for b in range(B):  # one sequence at a time bounds the memory to [Hq, L]
        qg = q[b].view(Hkv, Hq // Hkv, D).float()
        logits = torch.matmul(qg, keys[b].float().transpose(-1, -2)).reshape(Hq, -1) * scale  # [Hq, L]
        probs = torch.softmax(logits, -1)
        sorted_p = probs.sort(-1, descending=True).values
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each element
        out[b] = (before < p).sum(-1).clamp_min(1).cpu()
        del logits, probs, sorted_p, before
    return out


def budget_summary(counts: torch.Tensor) -> dict:
    """``{"mean", "min", "max", "median"}`` of per-head token counts."""
    c = counts.double().flatten()
    return {"mean": float(c.mean()), "min": float(c.min()), "max": float(c.max()), "median": float(c.median())}


# ---------------------------------------------------------------------- synthetic profile
def power_law_quantiles(n: int, lo: float, hi: float, exponent: float) -> torch.Tensor:
    """``n`` points of the truncated power law ``density ∝ x**-exponent`` on ``[lo, hi]`` at quantiles
    ``(i + 0.5) / n`` (a stratified draw: every set of ``n`` heads spans the distribution)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if abs(exponent - 1.0) < 1e-9:
        return lo * (hi / lo) ** u
    a = 1.0 - exponent
    return (lo ** a + u * (hi ** a - lo ** a)) ** (1.0 / a)


@dataclass
class SyntheticProfile:
    """Queries and keys with a controlled, realistic spread of per-head attention budgets.

    Construction, per sequence and kv-head: an orthonormal direction ``u_h`` for each of its ``G`` query
    heads; the query is ``q_h = tau * sqrt(D) * u_h``, so with the usual scale ``D**-0.5`` a noise key
    ``k ~ N(0, I)`` gets the logit ``tau * (u_h · k) ~ N(0, tau²)``. A hot token of head ``h`` has its
    component along ``u_h`` replaced by ``boost / tau`` (plus a little jitter), where
    ``boost = log(hot_mass / (1 - hot_mass) * (L - n_h) / n_h) + tau² / 2`` gives its ``n_h`` hot tokens
    ``hot_mass`` of the softmax mass. Hot tokens come in runs of ``run`` consecutive positions (attention
    is local: Quest's pages find them), at random places. Values are ``N(0, 1)``.

    Args:
        batch, num_q_heads, num_kv_heads, head_dim, length: the shape.
        dtype, device: of the generated tensors.
        min_hot, max_hot, exponent: hot-set sizes per head at ``ref_length`` (truncated power law).
        growth: hot-set sizes scale as ``(length / ref_length) ** growth`` (0: fixed, 1: linear).
        hot_mass: share of each head's softmax mass on its hot tokens.
        tau: standard deviation of the cold tokens' logits.
        run: hot tokens per contiguous run.
        seed: everything is a deterministic function of the seed (per device type).
    """

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    length: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    min_hot: float = 1.0
    max_hot: float = 2000.0
    exponent: float = 1.3
    growth: float = 0.5
    ref_length: int = REF_LENGTH
    hot_mass: float = 0.9
    tau: float = 1.0
    run: int = 8
    seed: int = 0
    hot_counts: torch.Tensor = field(init=False, repr=False)  # [B, Hq] int64

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_q_heads // self.num_kv_heads > self.head_dim:
            raise ValueError("the GQA group must not exceed head_dim (one orthogonal direction per query head)")
        if not 0.0 < self.hot_mass < 1.0:
            raise ValueError(f"hot_mass={self.hot_mass} must lie in (0, 1)")
        self.device = torch.device(self.device)
        B, Hq, Hkv, D, L = self.batch, self.num_q_heads, self.num_kv_heads, self.head_dim, self.length
        G = Hq // Hkv
        gen = torch.Generator().manual_seed(self.seed)
        scale_up = (L / self.ref_length) ** self.growth
        base = power_law_quantiles(Hq, self.min_hot, self.max_hot, self.exponent) * scale_up
        counts = torch.empty(B, Hq, dtype=torch.long)
        for b in range(B):  # same spread in every sequence, heads shuffled
            counts[b] = base[torch.randperm(Hq, generator=gen)].round().long()
        self.hot_counts = counts.clamp(1, max(1, L // 2))
        # Orthonormal query directions per (b, kv-head): [B, Hkv, G, D]
        dirs = torch.linalg.qr(torch.randn(B * Hkv, D, G, generator=gen, dtype=torch.float64)).Q  # [B*Hkv, D, G]
        self._dirs = dirs.transpose(1, 2).reshape(B, Hkv, G, D)
        # Hot positions per (b, q-head): runs of `run` tokens at random starts.
        self._hot_pos: list[list[torch.Tensor]] = []
        self._hot_logit: list[list[torch.Tensor]] = []
        for b in range(B):
            pos_b, logit_b = [], []
            for h in range(Hq):
                n = int(self.hot_counts[b, h])
                pos_b.append(self._hot_positions(n, gen))
                boost = (math.log(self.hot_mass / (1 - self.hot_mass) * (L - n) / n) + self.tau ** 2 / 2)
                logit_b.append(boost + 0.25 * torch.randn(n, generator=gen, dtype=torch.float64))
            self._hot_pos.append(pos_b)
            self._hot_logit.append(logit_b)

    def _hot_positions(self, n: int, gen: torch.Generator) -> torch.Tensor:
        L, run = self.length, max(1, min(self.run, n))
        n_runs = -(-n // run)
        slots = L // run
        starts = torch.randperm(slots, generator=gen)[:n_runs] * run  # disjoint runs
        pos = (starts.view(-1, 1) + torch.arange(run)).flatten()[:n]
        return pos.sort().values

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def query(self) -> torch.Tensor:
        """``[B, Hq, D]`` decode queries."""
        q = self._dirs * (self.tau * math.sqrt(self.head_dim))
        return q.reshape(self.batch, self.num_q_heads, self.head_dim).to(self.device, self.dtype)

    def chunks(self, chunk: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(k, v)`` of positions ``[c0, c0 + chunk)`` in order, each ``[B, Hkv, n, D]``."""
        B, Hkv, D, G = self.batch, self.num_kv_heads, self.head_dim, self.group
        dirs = self._dirs.to(self.device, torch.float32)
        for i, c0 in enumerate(range(0, self.length, chunk)):
            c1 = min(self.length, c0 + chunk)
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + i + 1)
            k = torch.randn(B, Hkv, c1 - c0, D, generator=gen, device=self.device)
            v = torch.randn(B, Hkv, c1 - c0, D, generator=gen, device=self.device)
            for b in range(B):
                for kv in range(Hkv):
                    for g in range(G):
                        h = kv * G + g
                        pos = self._hot_pos[b][h]
                        sel = (pos >= c0) & (pos < c1)
                        if not bool(sel.any()):
                            continue
                        idx = (pos[sel] - c0).to(self.device)
                        target = (self._hot_logit[b][h][sel] / self.tau).to(self.device, torch.float32)
                        u = dirs[b, kv, g]  # [D]
                        rows = k[b, kv].index_select(0, idx)  # [n, D]
                        rows += (target - rows @ u).unsqueeze(-1) * u
                        k[b, kv].index_copy_(0, idx, rows)
            yield k.to(self.dtype), v.to(self.dtype)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole context ``(k, v) [B, Hkv, L, D]`` (for small sizes and tests)."""
        parts = list(self.chunks())
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


# ---------------------------------------------------------------------- replay of the embedded model
def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "twilight")


def replay_path(num_tokens: int = REF_LENGTH, prompt: str = "docs") -> str:
    """Where ``capture_replay`` stores a capture by default."""
    return os.path.join(default_cache_dir(), f"replay-smollm2-{prompt}-{num_tokens}.pt")


def _long_prompt_text(min_chars: int) -> str:
    """Offline natural-language text: Python's own reference documentation (``pydoc_data``)."""
    from pydoc_data.topics import topics

    parts, total = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        total += len(topics[key])
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def capture_replay(num_tokens: int = 4400, path: str | None = None, model=None, tokenizer=None,
                   prompt: str = "docs",
                   question: str = "\n\nQuestion: In the documentation above, what does the 'with' statement do?\n"
                                   "Answer:") -> str:
    """Record the embedded model's post-RoPE queries, keys and values on a long prompt; returns the file.

    One forward pass over ``num_tokens`` tokens records, for every layer, the last position's query ``[Hq, D]``
    and all keys and values ``[Hkv, T, D]`` (fp16). ``prompt``: ``"docs"`` (offline documentation text ending in
    ``question``) or ``"passkey"`` (``twilight.models.passkey_prompt``: repetitive filler around a key).
    The recording is ``twilight.integrations.capture.capture_qkv``.
    Saved with ``torch.save`` to ``path`` (default ``~/.cache/twilight/replay-smollm2-<prompt>-<num_tokens>.pt``).
    """
    path = path or replay_path(num_tokens, prompt)
    if model is None or tokenizer is None:
        import twilight

        loaded = twilight.load_default_model()
        model, tokenizer = (loaded if isinstance(loaded, tuple) else (loaded, getattr(loaded, "tokenizer", None)))
    if prompt == "passkey":
        from twilight.models import passkey_prompt

        ids = tokenizer(passkey_prompt(tokenizer, num_tokens), return_tensors="pt").input_ids
    elif prompt == "docs":
        q_ids = tokenizer(question, return_tensors="pt").input_ids[0]
        text_ids = tokenizer(_long_prompt_text(num_tokens * 6), return_tensors="pt").input_ids[0]
        n_text = num_tokens - q_ids.numel()
        if text_ids.numel() < n_text:
            raise RuntimeError(f"offline text too short: {text_ids.numel()} tokens < {n_text}")
        ids = torch.cat([text_ids[:n_text], q_ids]).unsqueeze(0)
    else:
        raise ValueError(f"prompt={prompt!r} is invalid: must be 'docs' or 'passkey'")
    from twilight.integrations.capture import capture_qkv

    records = {i: {name: t[0] for name, t in rec.items()}  # batch 1: q [Hq, D], k / v [Hkv, T, D]
               for i, rec in capture_qkv(model, ids, last_query_only=True, dtype=torch.float16).items()}
    layers = sorted(records)
    data = {"q": torch.stack([records[i]["q"] for i in layers]),  # [layers, Hq, D]
            "k": torch.stack([records[i]["k"] for i in layers]),  # [layers, Hkv, T, D]
            "v": torch.stack([records[i]["v"] for i in layers]),
            "scale": float(getattr(model.model.layers[0].self_attn, "scaling", records[0]["q"].shape[-1] ** -0.5)),
            "num_tokens": ids.shape[1], "prompt": prompt, "model": getattr(model.config, "_name_or_path", "smollm2")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(data, path)
    return path


@dataclass
class ReplayProfile:
    """Real queries/keys/values of one layer of the embedded model, extended to ``length`` tokens.

    Positions: the first ``sink`` captured tokens, then the captured middle tiled until the context is
    ``length - recent`` long, then the last ``recent`` captured tokens. Every sequence of the batch gets
    the same context. The capture's head shape (SmolLM2: 9/3/64) is the profile's.
    """

    capture_path: str
    length: int
    batch: int = 1
    layer: int = 15
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    sink: int = 4
    recent: int = 256

    def __post_init__(self) -> None:
        data = torch.load(self.capture_path, map_location="cpu")
        self.device = torch.device(self.device)
        self._q = data["q"][self.layer].float()  # [Hq, D]
        self._k = data["k"][self.layer]  # [Hkv, T, D]
        self._v = data["v"][self.layer]
        self.scale = float(data["scale"])
        self.num_kv_heads, T, self.head_dim = self._k.shape
        self.num_q_heads = self._q.shape[0]
        if T <= self.sink + self.recent:
            raise ValueError(f"the capture holds {T} tokens: too few for sink={self.sink} + recent={self.recent}")

    def _positions(self) -> torch.Tensor:
        """Index into the captured tokens for each of the ``length`` positions."""
        T = self._k.shape[1]
        if self.length <= T:  # a shorter context: keep the sink and the most recent tokens
            return torch.cat([torch.arange(self.sink), torch.arange(T - (self.length - self.sink), T)])
        middle = torch.arange(self.sink, T - self.recent)
        need = self.length - self.sink - self.recent
        tiled = middle.repeat(-(-need // middle.numel()))[:need]
        return torch.cat([torch.arange(self.sink), tiled, torch.arange(T - self.recent, T)])

    def query(self) -> torch.Tensor:
        return self._q.unsqueeze(0).expand(self.batch, -1, -1).to(self.device, self.dtype).contiguous()

    def chunks(self, chunk: int = 8192) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pos = self._positions()
        for c0 in range(0, self.length, chunk):
            idx = pos[c0:c0 + chunk]
            k = self._k.index_select(1, idx).to(self.device, self.dtype)
            v = self._v.index_select(1, idx).to(self.device, self.dtype)
            yield (k.unsqueeze(0).expand(self.batch, -1, -1, -1).contiguous(),
                   v.unsqueeze(0).expand(self.batch, -1, -1, -1).contiguous())

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(self.chunks())
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


def replay_budgets(capture_path: str, p: float = 0.85, skip_layers: tuple[int, ...] = (0, 1)) -> dict:
    """Oracle top-p budgets of the captured model over its layers (``skip_layers``: the dense ones)."""
    data = torch.load(capture_path, map_location="cpu")
    q, k = data["q"].float(), data["k"].float()
    layers = [i for i in range(q.shape[0]) if i not in skip_layers]
    counts = torch.stack([oracle_top_p_budgets(q[i].unsqueeze(0), k[i].unsqueeze(0), data["scale"], p)[0]
                          for i in layers])  # [layers, Hq]
    return {"context": int(data["num_tokens"]), "p": p, **budget_summary(counts), "per_layer_head": counts.tolist()}


def main(argv=None) -> None:
    """Print the synthetic profile's oracle budgets (and the replay's, with ``--replay``)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--length", type=int, default=REF_LENGTH)
    parser.add_argument("--heads", default="32/8/128", help="Hq/Hkv/D")
    parser.add_argument("--p", type=float, default=0.85)
    parser.add_argument("--replay", action="store_true", help="also capture (once) and measure the embedded model")
    parser.add_argument("--replay-tokens", default=str(REF_LENGTH), help="comma-separated prompt lengths")
    parser.add_argument("--replay-prompt", default="docs,passkey", help="docs and/or passkey")
    args = parser.parse_args(argv)
    hq, hkv, d = (int(x) for x in args.heads.split("/"))
    prof = SyntheticProfile(1, hq, hkv, d, args.length)
    k, _ = prof.keys_values()
    counts = oracle_top_p_budgets(prof.query(), k, prof.scale, args.p)
    print(f"synthetic {args.heads} at {args.length} tokens, p={args.p}: oracle budget per head "
          f"{budget_summary(counts)}; hot sets {budget_summary(prof.hot_counts)}")
    if args.replay:
        for prompt in args.replay_prompt.split(","):
            for n in args.replay_tokens.split(","):
                path = replay_path(int(n), prompt)
                if not os.path.exists(path):
                    capture_replay(int(n), path, prompt=prompt)
                s = replay_budgets(path, args.p)
                s.pop("per_layer_head")
                print(f"replay (SmolLM2-135M, {prompt} prompt, layers 2..29) at {s['context']} tokens, p={args.p}: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in s.items() if k in ("mean", "median", "min", "max")))


if __name__ == "__main__":
    main()
