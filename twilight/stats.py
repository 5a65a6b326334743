"""`BudgetStats`: how many tokens each layer and head attended to during decoding.

The pipeline records every decode step of every layer: per query head the size of its own kept set
(after pruning; the candidate count when nothing prunes), per kv-head the tokens actually read (the union
over its query heads), and the context length. Recording only keeps references to the step's count tensors;
they are reduced in batches (every ``_FOLD_EVERY`` steps of a layer, and when read), so a decode step pays
no tensor op and no synchronisation for its statistics. A step that ``torch.compile`` captures adds into running
sums of fixed shape instead, in place (a few elementwise ops, no host read); reading merges both.

``as_dict()`` keys:

- ``mean_attended_tokens``: mean kept tokens per (step, sequence, query head) over the *sparse* layers.
- ``mean_context_tokens``: mean valid context length per (step, sequence).
- ``attended_fraction``: their ratio.
- ``mean_kv_tokens_read``: mean union size per (step, sequence, kv-head) over the sparse layers.
- ``min_attended_tokens`` / ``max_attended_tokens``: extremes over all query heads and steps (sparse layers).
- ``per_layer``: one dict per layer with ``layer``, ``dense``, ``mean_attended_tokens``,
  ``mean_kv_tokens_read``, ``steps``.
- ``per_head``: ``[layers][Hq]`` mean kept tokens per query head (``None`` for layers never run).
- ``decode_steps``: recorded (step, sequence) pairs per layer (the maximum over layers).
"""
from __future__ import annotations

import torch

_FOLD_EVERY = 64  # pending steps of a layer reduced together


class BudgetStats:
    def __init__(self, num_layers: int, num_q_heads: int, num_kv_heads: int):
        self.num_layers, self.num_q_heads, self.num_kv_heads = num_layers, num_q_heads, num_kv_heads
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._q_sum: dict[int, torch.Tensor] = {}
        self._kv_sum: dict[int, torch.Tensor] = {}
        self._q_min: dict[int, torch.Tensor] = {}
        self._q_max: dict[int, torch.Tensor] = {}
        self._ctx_sum: dict[int, torch.Tensor] = {}
        self._rows: dict[int, int] = {}
        self._dense: dict[int, bool] = {}
        self._pending: dict[int, list] = {}
        # Running sums that a compiled decode step adds to in place (a list that grows would be a guard on its
        # length: one recompilation per step); ``_fold`` merges them. Scalars are 1-element tensors: inductor (torch
        # 2.13, CPU) loses in-place updates of 0-dim float64 tensors.
        self._live = {layer: self._new_live() for layer in range(self.num_layers)}

    def _new_live(self) -> dict[str, torch.Tensor]:
        f64 = torch.float64
        with torch.inference_mode(False):  # normal tensors, updatable in place inside inference mode or out of it
            return {"q_sum": torch.zeros(self.num_q_heads, dtype=f64),
                    "kv_sum": torch.zeros(self.num_kv_heads, dtype=f64),
                    "q_min": torch.full((self.num_q_heads,), float("inf"), dtype=f64),
                    "q_max": torch.full((self.num_q_heads,), float("-inf"), dtype=f64),
                    "ctx_sum": torch.zeros(1, dtype=f64), "rows": torch.zeros(1, dtype=torch.int64)}

    def record(self, layer: int, q_counts: torch.Tensor | None, kv_counts: torch.Tensor,
               context: "torch.Tensor | tuple[int, torch.Tensor]", dense: bool) -> None:
        """One decode step of ``layer``: ``q_counts [B, Hq]`` (``None``: each query head kept its kv-head's
        candidates), ``kv_counts [B, Hkv]``, ``context [B]`` valid tokens or ``(length, start [B])``."""
        if torch.compiler.is_compiling():
            self._record_in_place(layer, q_counts, kv_counts, context, dense)
            return
        self._pending.setdefault(layer, []).append((q_counts, kv_counts, context))
        self._dense[layer] = dense
        if len(self._pending[layer]) >= _FOLD_EVERY:
            self._fold(layer)

    def _record_in_place(self, layer, q_counts, kv_counts, context, dense) -> None:
        """``record`` inside a compiled step: into the layer's running sums, in place."""
        acc = self._live[layer]
        q, ctx = self._q_rows(q_counts, kv_counts).to(torch.float64), self._context_rows(context)
        acc["q_sum"].add_(q.sum(0))
        acc["kv_sum"].add_(kv_counts.to(torch.float64).sum(0))
        torch.minimum(acc["q_min"], q.amin(0), out=acc["q_min"])
        torch.maximum(acc["q_max"], q.amax(0), out=acc["q_max"])
        acc["ctx_sum"].add_(ctx.to(torch.float64).sum().view(1))
        acc["rows"].add_(q.shape[0])
        self._dense[layer] = dense

    def _fold(self, layer: int) -> None:
        acc = self._live.get(layer)
        if acc is not None and int(acc["rows"]):  # what compiled steps added in place, merged as one more entry
            self._merge(layer, acc["q_sum"], acc["kv_sum"], acc["q_min"], acc["q_max"], acc["ctx_sum"][0],
                        int(acc["rows"]))
            with torch.inference_mode(False):
                for name, value in self._new_live().items():
                    acc[name].copy_(value)
        pending = self._pending.pop(layer, None)
        if not pending:
            return
        # Rows of (step, sequence): concatenated, so steps of different batch sizes fold together.
        kv = torch.cat([kv_counts for _, kv_counts, _ in pending]).to(torch.float64)  # [rows, Hkv]
        q = torch.cat([self._q_rows(q, kv) for q, kv, _ in pending]).to(torch.float64)  # [rows, Hq]
        ctx = torch.cat([self._context_rows(c) for _, _, c in pending]).to(torch.float64)  # [rows]
        self._merge(layer, q.sum(0), kv.sum(0), q.amin(0), q.amax(0), ctx.sum(), q.shape[0])

    def _q_rows(self, q_counts: torch.Tensor | None, kv_counts: torch.Tensor) -> torch.Tensor:
        """``[B, Hq]`` tokens kept per query head (its kv-head's count when nothing pruned)."""
        group = self.num_q_heads // self.num_kv_heads
        return kv_counts.repeat_interleave(group, dim=1) if q_counts is None else q_counts

    @staticmethod
    def _context_rows(context: "torch.Tensor | tuple[int, torch.Tensor]") -> torch.Tensor:
        """``[B]`` valid context tokens, from ``context`` as ``record`` takes it."""
        return (context[0] - context[1]).clamp_min(0) if isinstance(context, tuple) else context

    def _merge(self, layer: int, q_sum, kv_sum, q_min, q_max, ctx_sum, rows: int) -> None:
        if layer not in self._q_sum:
            self._q_sum[layer], self._kv_sum[layer] = q_sum.clone(), kv_sum.clone()
            self._q_min[layer], self._q_max[layer] = q_min.clone(), q_max.clone()
            self._ctx_sum[layer], self._rows[layer] = ctx_sum.clone(), rows
        else:  # out of place: the sums may be inference tensors folded into outside inference mode, or vice versa
            self._q_sum[layer] = self._q_sum[layer] + q_sum
            self._kv_sum[layer] = self._kv_sum[layer] + kv_sum
            self._q_min[layer] = torch.minimum(self._q_min[layer], q_min)
            self._q_max[layer] = torch.maximum(self._q_max[layer], q_max)
            self._ctx_sum[layer] = self._ctx_sum[layer] + ctx_sum
            self._rows[layer] += rows

    def _fold_all(self) -> None:
        for layer in set(self._pending) | set(self._live):
            self._fold(layer)

    @classmethod
    def concat_heads(cls, parts: "list[BudgetStats]") -> "BudgetStats":
        """One ``BudgetStats`` over the heads of ``parts``, in order (tensor-parallel ranks, each with its heads).

        Every part must have recorded the same layers and steps over the same sequences, as the ranks of a
        tensor-parallel model do; per-head figures are concatenated, context lengths taken from the first.
        """
        if not parts:
            raise ValueError("concat_heads needs at least one BudgetStats")
        for p in parts:
            p._fold_all()
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if p.num_layers != first.num_layers or p._rows != first._rows:
                raise ValueError(f"parts[{i}] recorded other layers or steps ({p._rows}) than parts[0] ({first._rows})")
        out = cls(first.num_layers, sum(p.num_q_heads for p in parts), sum(p.num_kv_heads for p in parts))
        for layer in first._rows:
            out._q_sum[layer] = torch.cat([p._q_sum[layer].cpu() for p in parts])
            out._kv_sum[layer] = torch.cat([p._kv_sum[layer].cpu() for p in parts])
            out._q_min[layer] = torch.cat([p._q_min[layer].cpu() for p in parts])
            out._q_max[layer] = torch.cat([p._q_max[layer].cpu() for p in parts])
            out._ctx_sum[layer] = first._ctx_sum[layer].cpu().clone()
            out._rows[layer] = first._rows[layer]
            out._dense[layer] = first._dense[layer]
        return out

    @property
    def decode_steps(self) -> int:
        self._fold_all()
        return max(self._rows.values(), default=0)

    def as_dict(self) -> dict:
        self._fold_all()
        layers = sorted(self._rows)
        per_layer, per_head = [], [None] * self.num_layers
        sparse_q, sparse_kv, sparse_rows, lo, hi = 0.0, 0.0, 0, float("inf"), float("-inf")
        for layer in layers:
            rows = self._rows[layer]
            q_mean = (self._q_sum[layer] / rows).tolist()
            kv_total = float(self._kv_sum[layer].sum())
            per_head[layer] = q_mean
            per_layer.append({"layer": layer, "dense": self._dense[layer],
                              "mean_attended_tokens": float(sum(q_mean) / len(q_mean)),
                              "mean_kv_tokens_read": kv_total / (rows * self.num_kv_heads), "steps": rows})
            if not self._dense[layer]:
                sparse_q += float(self._q_sum[layer].sum())
                sparse_kv += kv_total
                sparse_rows += rows
                lo = min(lo, float(self._q_min[layer].min()))
                hi = max(hi, float(self._q_max[layer].max()))
        ctx_layer = layers[0] if layers else None
        mean_ctx = float(self._ctx_sum[ctx_layer] / self._rows[ctx_layer]) if layers else 0.0
        mean_att = sparse_q / (sparse_rows * self.num_q_heads) if sparse_rows else mean_ctx
        return {
            "mean_attended_tokens": mean_att,
            "mean_context_tokens": mean_ctx,
            "attended_fraction": mean_att / mean_ctx if mean_ctx else 0.0,
            "mean_kv_tokens_read": sparse_kv / (sparse_rows * self.num_kv_heads) if sparse_rows else mean_ctx,
            "min_attended_tokens": lo if sparse_rows else mean_ctx,
            "max_attended_tokens": hi if sparse_rows else mean_ctx,
            "decode_steps": self.decode_steps,
            "per_layer": per_layer,
            "per_head": per_head,
        }

    def summary(self) -> str:
        """A short printable report."""
        d = self.as_dict()
        if not d["decode_steps"]:
            return "BudgetStats: no decode steps recorded"
        lines = [f"decode steps: {d['decode_steps']}   context: {d['mean_context_tokens']:.0f} tokens   "
                 f"attended per head: {d['mean_attended_tokens']:.1f} mean "
                 f"({d['min_attended_tokens']:.0f}..{d['max_attended_tokens']:.0f}), "
                 f"{100 * d['attended_fraction']:.2f}% of the context",
                 "layer  dense  attended/head  kv-tokens read"]
        for row in d["per_layer"]:
            dense = "yes" if row["dense"] else "no"
            lines.append(f"{row['layer']:>5}  {dense:>5}  {row['mean_attended_tokens']:>13.1f}"
                         f"  {row['mean_kv_tokens_read']:>14.1f}")
        return "\n".join(lines)

    def plot(self, path: str | None = None, title: str = "Attended tokens per head"):
        """Heatmap of mean attended tokens, layers × query heads (log colour scale). Returns the figure."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        d = self.as_dict()
        grid = [[float("nan")] * self.num_q_heads if row is None else row for row in d["per_head"]]
        data = torch.tensor(grid).clamp_min(1.0).numpy()
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * self.num_q_heads + 2), max(3, 0.25 * self.num_layers + 1.5)))
        im = ax.imshow(data, aspect="auto", norm=LogNorm(), cmap="viridis")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}\n(mean context {d['mean_context_tokens']:.0f} tokens)")
        fig.colorbar(im, ax=ax, label="tokens attended (mean per step)")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
