"""Speculative decoding with prompt lookup on SmolLM2-135M-Instruct: decode tokens per second
against plain greedy decoding, on a workload where the answer copies its prompt (rewriting a
given text) and on one where it does not (open-ended writing), with the accepted tokens per
verification.

Both sides run ``jaxkv.engine.generate`` on the same prompts in the same process, one after the
other, greedy, compile time excluded (every step shape is compiled before the timed run); each
figure is the median of ``--repeats`` runs. The outputs of both sides are checked to be the
same tokens.

    .venv/bin/python benchmarks/speculative.py
    .venv/bin/python benchmarks/speculative.py --num-draft 2,4,6 --batch 1,4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import format_table  # noqa: E402

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He cleaned the "
    "great lens, trimmed the wick and wound the clockwork that turned the light. Ships far out "
    "at sea watched for its beam, and the fishermen of the village said that as long as the "
    "old man kept the lamp burning, no boat of theirs would be lost on the rocks. One winter a "
    "storm broke the windows of the lantern room, and the keeper worked through the night with "
    "boards and nails to keep the flame alive until morning."
)

WORKLOADS = {
    "rewrite (copies its prompt)": (
        "Rewrite the following text exactly as it is, keeping every sentence:\n\n" + TEXT
    ),
    "open-ended writing": "Write a short story about a dragon who wants to learn to paint.",
}


def _run(model, prompts, max_new_tokens, speculative):
    from jaxkv.engine import generate

    return generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        cache="paged",
        ignore_eos=True,
        speculative=speculative,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-draft", default="4", help="comma-separated draft counts")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes")
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--ngram-max", type=int, default=3)
    args = parser.parse_args()

    from jaxkv.engine import Model, SpeculativeConfig

    model = Model.load()
    rows = []
    for name, text in WORKLOADS.items():
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": text}])
        for batch in (int(b) for b in args.batch.split(",")):
            prompts = [prompt] * batch
            plain_rates, plain_tokens = [], None
            for _ in range(args.repeats):
                plain = _run(model, prompts, args.max_new_tokens, None)
                plain_rates.append(plain.decode_tokens_per_second)
                plain_tokens = [g.token_ids for g in plain.generations]
            base = statistics.median(plain_rates)
            rows.append([name, batch, "plain greedy", "-", f"{base:.1f}", "1.00x", "-", "-"])
            for k in (int(n) for n in args.num_draft.split(",")):
                config = SpeculativeConfig(
                    "ngram", k, ngram_max=args.ngram_max, ngram_min=args.ngram_min
                )
                rates = []
                for _ in range(args.repeats):
                    fast = _run(model, prompts, args.max_new_tokens, config)
                    rates.append(fast.decode_tokens_per_second)
                    same = [g.token_ids for g in fast.generations] == plain_tokens
                    if not same:
                        raise SystemExit(f"{name}: speculative output differs from plain greedy")
                stats = fast.engine_stats
                rate = statistics.median(rates)
                rows.append(
                    [
                        name,
                        batch,
                        f"ngram k={k}",
                        f"{stats.num_verify_steps}",
                        f"{rate:.1f}",
                        f"{rate / base:.2f}x",
                        f"{stats.tokens_per_verification:.2f}",
                        f"{100 * stats.draft_acceptance_rate:.0f}%",
                    ]
                )
    print(
        f"SmolLM2-135M-Instruct, paged cache, greedy, {args.max_new_tokens} new tokens per "
        f"sequence, median of {args.repeats} runs (outputs identical to plain greedy)"
    )
    print(
        format_table(
            [
                "workload",
                "batch",
                "decoding",
                "verify steps",
                "decode tok/s",
                "vs plain",
                "tokens/verification",
                "drafts accepted",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
