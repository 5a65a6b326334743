"""Tensor parallelism: a ``tp_plan="auto"`` model under torchrun (2 CPU processes, gloo) patched by Twilight.

Each rank runs Twilight on its own heads: the dense preset is token-identical to the unpatched TP model, a
sparse config decodes exactly as the same config on the unsharded model, and the budgets gathered from both
ranks equal the unsharded model's.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_tp_worker.py")


def _cpu_tensor_parallel_possible() -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        return False
    accelerator = getattr(torch._C, "_get_accelerator", None)  # transformers picks the build's accelerator
    return accelerator is None or accelerator().type == "cpu"


@pytest.mark.skipif(not _cpu_tensor_parallel_possible(), reason="needs torch.distributed with gloo on a CPU build")
def test_two_cpu_ranks(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(tmp_path / "model"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in range(2)]
    for r in results:
        assert r["world"] == 2 and r["tp_size"] == 2
        assert r["local_heads"] == [2, 1]  # each rank: half the query heads and the kv-head of their group
        assert r["tp_unpatched_equals_plain"]
        assert r["tp_dense_preset_equals_unpatched"] and r["dense_decode_steps"] == 9 * 2
        assert r["sparse_differs_from_dense"]  # the sparse config really changes the output...
        assert r["tp_sparse_equals_plain_sparse"]  # ...and sharding does not
        local = r["local_stats"]
        assert local["decode_steps"] == 9 * 2 and 0 < local["attended_fraction"] < 1
        assert all(len(heads) == 2 for heads in local["per_head"])
        gathered, plain = r["gathered_stats"], r["plain_stats"]
        assert all(len(heads) == 4 for heads in gathered["per_head"])
        for key in ("decode_steps", "mean_context_tokens", "min_attended_tokens", "max_attended_tokens"):
            assert gathered[key] == pytest.approx(plain[key])
        assert gathered["mean_attended_tokens"] == pytest.approx(plain["mean_attended_tokens"])
        assert gathered["per_head"] == [pytest.approx(h) for h in plain["per_head"]]
    assert results[0]["gathered_stats"] == results[1]["gathered_stats"]
    assert results[0]["local_stats"]["per_head"] != results[1]["local_stats"]["per_head"]  # different heads
