"""Budget per layer and head of Twilight on the default model, as a heatmap.

Loads SmolLM2-135M-Instruct (``twilight.load_default_model``, offline), patches it with a Twilight config,
decodes a few tokens after a passkey-retrieval prompt of ``--length`` tokens, prints
``budget_stats(model).summary()`` and saves ``BudgetStats.plot()`` (layers × query heads, log colour scale).

    python scripts/budget_heatmap.py                                   # quest-twilight at ~4k tokens
    python scripts/budget_heatmap.py --config twilight --length 2000 --out budget.png
"""
from __future__ import annotations

import argparse
import time

import torch

import twilight
from twilight.models import passkey_prompt


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quest-twilight", help="preset name, JSON path (default: quest-twilight)")
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default: 4096)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default: 8)")
    parser.add_argument("--passkey", default="68217")
    parser.add_argument("--depth", type=float, default=0.5, help="relative position of the passkey (default: 0.5)")
    parser.add_argument("--out", default="budget_heatmap.png", help="PNG path (default: budget_heatmap.png)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model, tokenizer = twilight.load_default_model(device=args.device)
    twilight.patch(model, args.config)
    inputs = tokenizer(passkey_prompt(tokenizer, args.length, args.passkey, args.depth), return_tensors="pt")
    inputs = inputs.to(args.device)
    n = inputs.input_ids.shape[1]

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    answer = tokenizer.decode(out[0, n:], skip_special_tokens=True)

    stats = twilight.budget_stats(model)
    print(f"{twilight.DEFAULT_MODEL_ID}, config {args.config!r}, prompt {n} tokens, {elapsed:.1f}s")
    print(f"answer: {answer!r} (passkey {args.passkey}: {'found' if args.passkey in answer else 'MISSED'})")
    print(stats.summary())
    stats.plot(args.out, title=f"Tokens attended per head: {args.config}, SmolLM2-135M")
    print(f"heatmap saved to {args.out}")
    return stats.as_dict()


if __name__ == "__main__":
    main()
