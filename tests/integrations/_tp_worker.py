"""torchrun worker for test_tensor_parallel.py: ``python -m torch.distributed.run ... _tp_worker.py MODEL OUT``.

Each rank loads the model twice (plain, and sharded with ``tp_plan="auto"``), generates with both, patched and
unpatched, and writes ``OUT/result_<rank>.json`` for the test to check.
"""
import datetime
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import twilight
from twilight.integrations import hf

SPARSE = {"selector": {"type": "quest", "token_budget": 16, "page_size": 4}, "estimator": {"type": "int4"},
          "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [],
          "dense_below": 0}  # sparse from the first step (a subprocess: tests/conftest.py does not apply)


def main(model_dir: str, out_dir: str) -> None:
    # Our own process group: a short timeout instead of transformers' two hours, so a stuck peer fails fast.
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding in the second sequence
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)

    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref_dense = plain.generate(**kw)
    twilight.patch(plain, SPARSE)
    ref_sparse = plain.generate(**kw)
    ref_stats = twilight.budget_stats(plain).as_dict()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tp_plan= is deprecated in newer releases
        model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    tp_dense = model.generate(**kw)
    twilight.patch(model, "dense")
    patched_dense = model.generate(**kw)
    dense_steps = twilight.budget_stats(model).as_dict()["decode_steps"]
    twilight.patch(model, SPARSE)
    tp_sparse = model.generate(**kw)
    local = twilight.budget_stats(model)
    gathered = hf.gather_budget_stats(model).as_dict()
    result = {
        "rank": rank, "world": dist.get_world_size(), "tp_size": model.tp_size,
        "local_heads": [local.num_q_heads, local.num_kv_heads],
        "tp_unpatched_equals_plain": torch.equal(tp_dense, ref_dense),
        "tp_dense_preset_equals_unpatched": torch.equal(patched_dense, tp_dense),
        "dense_decode_steps": dense_steps,
        "tp_sparse_equals_plain_sparse": torch.equal(tp_sparse, ref_sparse),
        "sparse_differs_from_dense": not torch.equal(ref_sparse, ref_dense),
        "local_stats": local.as_dict(), "gathered_stats": gathered, "plain_stats": ref_stats,
    }
    with open(os.path.join(out_dir, f"result_{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
