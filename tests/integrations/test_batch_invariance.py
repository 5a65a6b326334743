"""A left-padded batch decodes exactly as each of its sequences alone, for every selector, alone and pruned by top-p.

Padding that is not a multiple of Quest's page size used to shift every page boundary of a sequence (pages were
cut at absolute positions), so Quest's answer depended on the other rows of the batch, and an evaluation's numbers
on how its samples were batched. Pages are now cut from each sequence's first valid token (``LayerCache``'s
``page_offset``); these tests compare greedy tokens, token for token, batched against alone, through
``twilight.patch`` and ``generate()``, with every layer sparse from the first decode step.
"""
from __future__ import annotations

import os

import pytest
import torch
from test_hf_patch import greedy, left_pad, prompts, tiny_model

import twilight
from twilight.integrations.capture import calibrate_double_sparse

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BUDGET = 24  # tokens per kv-head: below every prompt of the batch but the shortest, so every selector selects

SELECTORS = {
    "full": {"type": "full"},
    "quest": {"type": "quest", "token_budget": BUDGET},
    "streaming": {"type": "streaming", "sink_tokens": 4, "window": 12},
    "oracle_topk": {"type": "oracle_topk", "token_budget": BUDGET},
    "sparq": {"type": "sparq", "token_budget": BUDGET, "num_channels": 4},
    "tidal": {"type": "tidal", "token_budget": BUDGET, "reselection_layers": [1]},
    "snapkv": {"type": "snapkv", "token_budget": BUDGET, "observation_window": 8},
    "h2o": {"type": "h2o", "token_budget": BUDGET, "recent_tokens": 8},
    "double_sparse": {"type": "double_sparse", "token_budget": BUDGET, "num_channels": 4},
}
# Prompt lengths of one batch: the left padding of each (the longest minus its length) is a multiple of neither 8
# nor 16, except the longest's (0), and the shortest prompt fits in the budget (alone it attends to everything).
LENGTHS = [[50, 20, 35], [67, 41, 30, 19]]


_AVAILABLE = twilight.available_backends("cpu")
CPU = pytest.param("cpu", marks=pytest.mark.skipif(_AVAILABLE["cpu"] is not None, reason=f"cpu: {_AVAILABLE['cpu']}"))
TRITON = pytest.mark.skipif(not INTERPRET or _AVAILABLE["triton"] is not None,
                            reason="the triton backend on the CPU needs triton and TRITON_INTERPRET=1")


def _config(selector, page_size, top_p, backend, tmp_path, model):
    sel = dict(SELECTORS[selector])
    if selector == "quest":
        sel["page_size"] = page_size
    if selector == "double_sparse":
        path = tmp_path / "channels.json"
        calibrate_double_sparse(model, torch.cat(prompts([64], seed=5)), num_channels=4, path=path)
        sel["channels_path"] = str(path)
    return {"selector": sel, "estimator": {"type": "int4" if top_p else "exact"},
            "pruner": {"type": "top_p", "p": 0.85} if top_p else {"type": "none"},
            "dense_layers": [], "dense_below": 0, "backend": backend}


def _assert_batch_equals_alone(model, lengths, seed=1):
    seqs = prompts(lengths, seed=seed)
    ids, mask = left_pad(seqs)
    alone = [greedy(model, s)[0, s.shape[1]:] for s in seqs]
    stats = twilight.budget_stats(model)
    stats.reset()
    batch = greedy(model, ids, mask)[:, ids.shape[1]:]
    for b, n in enumerate(lengths):
        assert torch.equal(batch[b], alone[b]), (f"the sequence of {n} tokens (left padding {max(lengths) - n}) "
                                                 f"decodes differently in the batch: {batch[b]} vs {alone[b]}")
    return stats.as_dict()


@pytest.mark.parametrize("top_p", [False, True], ids=["alone", "top_p"])
@pytest.mark.parametrize("selector", [s for s in SELECTORS if s != "quest"])
def test_every_selector_decodes_a_padded_batch_as_each_sequence_alone(selector, top_p, tmp_path):
    model = tiny_model(num_hidden_layers=3)
    twilight.patch(model, _config(selector, None, top_p, "torch", tmp_path, model))
    d = _assert_batch_equals_alone(model, LENGTHS[0])
    if selector != "full":
        assert d["attended_fraction"] < 1.0  # the steps really were sparse


@pytest.mark.parametrize("backend", ["torch", CPU])
@pytest.mark.parametrize("top_p", [False, True], ids=["alone", "top_p"])
@pytest.mark.parametrize("page_size", [8, 16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=["3-rows", "4-rows"])
def test_quest_pages_are_cut_per_sequence(lengths, page_size, top_p, backend, tmp_path):
    """Quest (whose pages used to be cut at absolute positions) on the CPU backends: the batch equals the rows alone."""
    model = tiny_model(num_hidden_layers=3)
    twilight.patch(model, _config("quest", page_size, top_p, backend, tmp_path, model))
    d = _assert_batch_equals_alone(model, lengths)
    assert d["attended_fraction"] < 1.0
    assert max(max(row) for row in d["per_head"]) <= -(-BUDGET // page_size) * page_size  # within Quest's budget


@TRITON
def test_quest_pages_are_cut_per_sequence_on_triton(tmp_path):
    """The triton kernels (selection, token update) under the interpreter: one case, as it runs ~50x slower."""
    test_quest_pages_are_cut_per_sequence(LENGTHS[0], 8, True, "triton", tmp_path)
