"""The HF transformers side of ``jaxkv bench``: a worker script that runs a workload through
``model.generate`` in static batches, for a side-by-side baseline.

It runs in another interpreter (one with torch, transformers, accelerate and gguf, which
jaxkv's own environment lacks), started by ``jaxkv.bench.runner.run_hf`` BY ITS PATH, so it
imports nothing from jaxkv and only the standard library at module level (torch is imported
in ``main``)::

    python hf.py --gguf MODEL.gguf --workload workload.json --out result.json

How it batches and times, on CPU in float32 with ``--threads`` torch threads:

* requests are taken in arrival order, ``--batch-size`` at a time; a batch starts once the
  previous one has finished and all its requests have arrived (static batching);
* prompts are left-padded to the longest in the batch (with an attention mask); every row
  generates the batch's longest output length, greedy, EOS ignored; a request's tokens are its
  first ``output_len`` ones (the rest is the waste of static batching);
* a streamer stamps ``time.perf_counter()`` after every generated step; a request's token
  times are the stamps of its own tokens, so its time to first token includes the wait for its
  batch, and it finishes at its last token (as if streamed);
* one untimed warm-up ``generate`` runs first.

Progress goes to stderr as ``jaxkv-bench-progress <done> <total>`` lines; the result file
holds ``{"backend": "hf", "wall_seconds", "records": [...], "info": {...}}`` with records in
the fields of ``jaxkv.bench.runner.RequestRecord``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

PROGRESS_PREFIX = "jaxkv-bench-progress"  # = runner.HF_PROGRESS_PREFIX (no import: see above)
WARMUP_PROMPT_TOKENS = 16
WARMUP_NEW_TOKENS = 2


def _progress(done: int, total: int) -> None:
    print(f"{PROGRESS_PREFIX} {done} {total}", file=sys.stderr, flush=True)


class _StepStamps:
    """A ``generate`` streamer that records when ``put`` is called.

    ``generate`` calls ``put`` once with the prompt (before the prefill), then once per step
    with that step's tokens ``[batch]``, and ``end`` when it is done.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Any, Any]:
    """``input_ids, attention_mask``: int64 ``[batch, longest prompt]``, prompts at the right."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _generate(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int, pad: int) -> list:
    """Greedy ``generate`` of exactly ``new_tokens`` per row; the stamp of each step."""
    import torch

    input_ids, attention_mask = _left_padded(prompts, pad)
    stamps = _StepStamps()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            streamer=stamps,
        )
    produced = output.shape[1] - input_ids.shape[1]
    # One stamp per step, after a first one for the prompt (kept out either way).
    if produced != new_tokens or len(stamps.times) not in (new_tokens, new_tokens + 1):
        raise RuntimeError(
            f"expected {new_tokens} generated steps, got {produced} tokens and "
            f"{len(stamps.times)} streamer calls"
        )
    return stamps.times[-new_tokens:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HF transformers worker of `jaxkv bench`")
    parser.add_argument("--gguf", required=True, type=pathlib.Path)
    parser.add_argument("--workload", required=True, type=pathlib.Path)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    requests = json.loads(args.workload.read_text())["requests"]

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32
    )
    model.eval()
    load_seconds = time.perf_counter() - started
    # EOS must not stop a row early: generate falls back to the model's own EOS id, so clear it.
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    pad = 0 if pad is None else int(pad)
    model.generation_config.eos_token_id = None

    warm_prompts = [r["prompt_token_ids"][:WARMUP_PROMPT_TOKENS] for r in requests]
    started = time.perf_counter()
    _generate(model, warm_prompts[: args.batch_size], WARMUP_NEW_TOKENS, pad)
    warmup_seconds = time.perf_counter() - started

    records = []
    _progress(0, len(requests))
    start = time.perf_counter()
    for first in range(0, len(requests), args.batch_size):
        batch = requests[first : first + args.batch_size]
        ready = start + max(r["arrival"] for r in batch)
        time.sleep(max(0.0, ready - time.perf_counter()))
        new_tokens = max(r["output_len"] for r in batch)
        stamps = _generate(model, [r["prompt_token_ids"] for r in batch], new_tokens, pad)
        for request in batch:
            own = [t - start for t in stamps[: request["output_len"]]]
            records.append(
                {
                    "index": request["index"],
                    "prompt_len": len(request["prompt_token_ids"]),
                    "output_len": request["output_len"],
                    "num_generated": len(own),
                    "arrival": request["arrival"],
                    "first_token": own[0],
                    "finished": own[-1],
                    "token_times": own,
                    "num_cached_tokens": None,
                    "error": None,
                }
            )
        _progress(len(records), len(requests))
    wall_seconds = max(r["finished"] for r in records)
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "dtype": "float32",
        "attention": getattr(model.config, "_attn_implementation", None),
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
    }
    result = {"backend": "hf", "wall_seconds": wall_seconds, "records": records, "info": info}
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
