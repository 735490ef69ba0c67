"""Prefixes on disk: time to first token of a long prompt prefilled cold against one whose prefix
is loaded from disk, what the files cost on disk, and how fast they are written and read.

On the bundled SmolLM2-135M (paged engine, 16-token pages), a ``--tokens``-token prompt (default
about 1,000), greedy:

1. time to first token, median of ``--repeats`` runs on a fresh engine each (compiled beforehand):
   * cold: the whole prompt prefilled;
   * prompt cache: ``Engine.load_prefix`` of the prompt's saved file, then the request (the load
     is inside the time);
   * prefix-cache directory: the request on an engine restarted on a ``prefix_cache_dir`` that
     holds the prompt's pages (they are read back on the prefix-cache miss, inside the time);
2. bytes per token: on disk (the prompt cache file / its tokens) against in the pool
   (``PagedCacheMetadata.bytes_per_token``);
3. save and load time per MiB of file: ``Engine.save_prefix`` and ``Engine.load_prefix``.

Every warm run's tokens are checked against the cold run's.

Run: ``.venv/bin/python benchmarks/persistence.py [--tokens 1000] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _common import format_table

from jaxkv.engine import CacheConfig, Engine, Model, SamplingParams, SchedulerConfig

PAGE_SIZE = 16
TEXT = (
    "A cache keeps the keys and values of every token a model has read, so that the next token "
    "costs one step instead of a pass over the whole text. Saving it to disk lets a later run "
    "start where an earlier one stopped. "
)


def prompt_ids(model: Model, tokens: int) -> list[int]:
    """About ``tokens`` token ids of English text (a whole number of sentences)."""
    ids: list[int] = []
    text = ""
    while len(ids) < tokens:
        text += TEXT
        ids = model.tokenizer.encode(text)
    return ids[:tokens]


def make_engine(model: Model, tokens: int, directory: str | None = None) -> Engine:
    max_model_len = -(-(tokens + 64) // 256) * 256
    return Engine(
        model,
        CacheConfig(
            kind="paged",
            page_size=PAGE_SIZE,
            num_pages=max_model_len // PAGE_SIZE + 8,
            prefix_cache_dir=directory,
        ),
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=256, max_model_len=max_model_len),
    )


def first_token(engine: Engine, ids: list[int], before=None) -> tuple[float, list[int]]:
    """Seconds from the start (``before()`` included) to the first token, and the tokens."""
    start = time.perf_counter()
    if before is not None:
        before(engine)
    request = engine.add_request(ids, SamplingParams(max_tokens=4, ignore_eos=True))
    seconds = None
    for output in engine.stream(request):
        if seconds is None and output.outputs[0].token_ids:
            seconds = time.perf_counter() - start
        if output.finished:
            return seconds, output.outputs[0].token_ids
    raise RuntimeError("the request did not finish")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    args = parser.parse_args()

    model = Model.load()
    ids = prompt_ids(model, args.tokens)
    work = tempfile.mkdtemp(prefix="jaxkv-persistence-")
    path = os.path.join(work, "prompt.jkv")
    directory = os.path.join(work, "prefixes")

    # Compile every shape once, and write the files the warm runs read.
    seed = make_engine(model, len(ids), directory)
    seed.warmup()
    _, expected = first_token(seed, ids)
    seed.save_prefix(path, ids)
    seed.persist_prefix_cache()
    for loader in (lambda e: e.load_prefix(path, ids), None):
        engine = make_engine(model, len(ids), directory)
        engine.warmup()
        first_token(engine, ids, loader)

    def timed(directory_or_none, before) -> float:
        times = []
        for _ in range(args.repeats):
            engine = make_engine(model, len(ids), directory_or_none)
            engine.warmup()
            seconds, tokens = first_token(engine, ids, before)
            if tokens != expected:
                raise AssertionError(f"a warm run drew {tokens}, the cold run {expected}")
            times.append(seconds)
        return statistics.median(times)

    cold = timed(None, None)
    loaded = timed(None, lambda engine: engine.load_prefix(path, ids))
    restored = timed(directory, None)

    file_bytes = os.path.getsize(path)
    saved_tokens = len(ids) // PAGE_SIZE * PAGE_SIZE
    in_pool = make_engine(model, len(ids)).backend.metadata.bytes_per_token()
    mib = file_bytes / 2**20

    def save_once() -> float:
        start = time.perf_counter()
        seed.save_prefix(path, ids)
        return time.perf_counter() - start

    def load_once() -> float:
        engine = make_engine(model, len(ids))
        start = time.perf_counter()
        engine.load_prefix(path, ids)
        jax_ready(engine)
        return time.perf_counter() - start

    save_seconds = statistics.median(save_once() for _ in range(args.repeats))
    load_seconds = statistics.median(load_once() for _ in range(args.repeats))

    print(f"SmolLM2-135M float32, {len(ids)}-token prompt, {PAGE_SIZE}-token pages, greedy")
    print()
    print(
        format_table(
            ["time to first token", "median ms", "x cold"],
            [
                ["cold prefill", f"{1000 * cold:.1f}", "1.00"],
                ["prompt cache file", f"{1000 * loaded:.1f}", f"{loaded / cold:.2f}"],
                ["prefix-cache dir (restart)", f"{1000 * restored:.1f}", f"{restored / cold:.2f}"],
            ],
        )
    )
    print()
    print(
        format_table(
            ["bytes per token", "bytes"],
            [
                ["on disk (prompt cache file)", f"{file_bytes / saved_tokens:,.0f}"],
                ["in the pool", f"{in_pool:,}"],
            ],
        )
    )
    print()
    print(
        format_table(
            ["prompt cache file", "median ms", "ms per MiB"],
            [
                [
                    f"save ({mib:.1f} MiB)",
                    f"{1000 * save_seconds:.1f}",
                    f"{1000 * save_seconds / mib:.2f}",
                ],
                [
                    f"load ({mib:.1f} MiB)",
                    f"{1000 * load_seconds:.1f}",
                    f"{1000 * load_seconds / mib:.2f}",
                ],
            ],
        )  # fmt: skip
    )
    return 0


def jax_ready(engine: Engine) -> None:
    """Wait for the pool's device arrays (a load dispatches its writes asynchronously)."""
    import jax

    jax.block_until_ready(engine.backend.cache)


if __name__ == "__main__":
    raise SystemExit(main())
