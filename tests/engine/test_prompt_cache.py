"""Prefixes on disk on the paged engine (a small random-weight Llama with the real tokenizer):
a prompt cache file (``Engine.load_prefix`` / ``save_prefix``, ``generate(prompt_cache=...)``)
gives the output of a cold run while prefilling only the uncached rest, and files that do not
fit fall back with a warning; a prefix-cache directory takes evicted pages, survives a restart,
stays under its size bound and keeps salted tenants apart."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from jaxkv.engine import (
    CacheConfig,
    Engine,
    Model,
    PromptCacheWarning,
    SamplingParams,
    SchedulerConfig,
    generate,
)
from jaxkv.engine.prefix_store import KEY_FILE, PAGE_SUFFIX
from jaxkv.io import CacheFileCorruptedError, FingerprintMismatchError

PAGE = 16
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.tiny()


def make_engine(model, num_pages=16, kind="paged", **cache) -> Engine:
    if kind == "contiguous":
        config = CacheConfig(kind="contiguous", **cache)
    else:
        config = CacheConfig(kind="paged", page_size=PAGE, num_pages=num_pages, **cache)
    return Engine(
        model,
        config,
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=256),
    )


def tokens(seed: int, count: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 40000, count).tolist()


def run(engine: Engine, prompt, salt=None):
    """The request's final output, with the logits of each drawn token."""
    request_id = engine.add_request(prompt, GREEDY, cache_salt=salt, output_logits=True)
    for output in engine.stream(request_id):
        if output.finished:
            return output
    raise AssertionError("the request did not finish")


def computed(engine: Engine, prompt, salt=None) -> tuple[object, int]:
    """``(output, tokens the model ran for it)``."""
    before = engine.stats().num_computed_tokens
    output = run(engine, prompt, salt)
    return output, engine.stats().num_computed_tokens - before


def assert_same(warm, cold) -> None:
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    np.testing.assert_allclose(warm.logits[0], cold.logits[0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A 50-token prompt run cold, and its prompt cache file (3 full pages)."""
    prompt = tokens(0, 50)
    engine = make_engine(model)
    cold = run(engine, prompt)
    path = str(tmp_path_factory.mktemp("prompt") / "prompt.jkv")
    result = engine.save_prefix(path, prompt)
    assert (result.saved_tokens, result.cached_tokens) == (48, 48)
    return prompt, cold, path


def test_identical_prompt_loads_every_full_page_and_recomputes_the_rest(model, saved):
    prompt, cold, path = saved
    engine = make_engine(model)
    loaded = engine.load_prefix(path, prompt)
    assert (loaded.saved_tokens, loaded.cached_tokens) == (48, 48)
    warm, ran = computed(engine, prompt)
    assert warm.num_cached_tokens == 48
    assert ran == 50 - 48 + GREEDY.max_tokens - 1  # the rest of the prompt, then the decodes
    assert_same(warm, cold)


def test_prompt_of_whole_pages_still_computes_its_last_token(model, tmp_path):
    prompt = tokens(5, 32)
    engine = make_engine(model)
    cold = run(engine, prompt)
    path = str(tmp_path / "whole.jkv")
    assert engine.save_prefix(path, prompt).saved_tokens == 32
    fresh = make_engine(model)
    assert fresh.load_prefix(path, prompt).cached_tokens == 32
    warm, ran = computed(fresh, prompt)
    # Logits come from the last prompt token: its page is computed again.
    assert warm.num_cached_tokens == 16 and ran == 16 + GREEDY.max_tokens - 1
    assert_same(warm, cold)


def test_shared_prefix_prompt_reuses_the_longest_saved_prefix(model, saved):
    prompt, _, path = saved
    other = prompt[:37] + tokens(9, 20)  # shares 2 full pages and 5 tokens
    cold = run(make_engine(model), other)
    engine = make_engine(model)
    assert engine.load_prefix(path, other).cached_tokens == 32
    warm, ran = computed(engine, other)
    assert warm.num_cached_tokens == 32 and ran == len(other) - 32 + GREEDY.max_tokens - 1
    assert_same(warm, cold)
    unrelated = make_engine(model)
    assert unrelated.load_prefix(path, tokens(10, 40)).cached_tokens == 0


@pytest.mark.parametrize(("kind", "reused"), [("paged", 32), ("contiguous", 39)])
def test_generate_with_a_prompt_cache_equals_a_cold_run(model, tmp_path, kind, reused):
    prompt = tokens(11, 40)
    path = tmp_path / "generate.jkv"
    options = dict(max_new_tokens=5, cache=kind, ignore_eos=True)
    cold = generate(model, [prompt], **options)
    first = generate(model, [prompt], prompt_cache=path, **options)
    assert first.cached_tokens == 0 and path.exists()
    stamp = os.stat(path).st_mtime_ns
    second = generate(model, [prompt], prompt_cache=path, **options)
    assert second.cached_tokens == reused and second.prefill_tokens == 40 - reused
    assert os.stat(path).st_mtime_ns == stamp  # it held the prompt already
    assert cold.generations[0].token_ids == first.generations[0].token_ids
    assert cold.generations[0].token_ids == second.generations[0].token_ids
    shorter = prompt[:30] + tokens(12, 4)
    third = generate(model, [shorter], prompt_cache=path, **options)
    assert third.cached_tokens == (16 if kind == "paged" else 30)
    assert (
        third.generations[0].token_ids
        == generate(model, [shorter], **options).generations[0].token_ids
    )
    other = "paged" if kind == "contiguous" else "contiguous"
    with pytest.warns(PromptCacheWarning, match="page_size"):
        generate(model, [shorter], prompt_cache=path, max_new_tokens=1, cache=other)
    with pytest.raises(ValueError, match="one prompt"):
        generate(model, [prompt, prompt], prompt_cache=path, cache=kind)


def test_contiguous_rows_reuse_a_saved_prompt_cut_to_the_shared_prefix(model, tmp_path):
    prompt = tokens(13, 30)
    engine = make_engine(model, kind="contiguous")
    cold = run(engine, prompt)
    path = str(tmp_path / "row.jkv")
    assert engine.save_prefix(path, prompt).saved_tokens == 30
    other = prompt[:21] + tokens(14, 9)
    cold_other = run(make_engine(model, kind="contiguous"), other)
    fresh = make_engine(model, kind="contiguous")
    assert fresh.load_prefix(path, other).cached_tokens == 21
    warm, ran = computed(fresh, other)
    assert warm.num_cached_tokens == 21 and ran == 9 + GREEDY.max_tokens - 1
    assert_same(warm, cold_other)
    again, ran = computed(fresh, prompt)  # the held row serves every later admission
    assert again.num_cached_tokens == 29 and ran == 1 + GREEDY.max_tokens - 1
    assert_same(again, cold)
    assert run(fresh, prompt, salt="other").num_cached_tokens == 0
    assert make_engine(model, kind="contiguous").save_prefix(path, prompt).saved_tokens == 0


def damaged(path: str, tmp_path, how: str) -> str:
    data = open(path, "rb").read()
    target = str(tmp_path / f"{how}.jkv")
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    else:
        data = b"not a cache file at all"
    with open(target, "wb") as file:
        file.write(data)
    return target


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage"])
def test_damaged_files_are_refused_and_generate_falls_back_with_a_warning(
    model, saved, tmp_path, how
):
    prompt, cold, path = saved
    bad = damaged(path, tmp_path, how)
    engine = make_engine(model)
    with pytest.raises(CacheFileCorruptedError):
        engine.load_prefix(bad, prompt)
    assert engine.backend.manager.cached_prefix(prompt) == ()  # nothing was registered
    assert_same(run(engine, prompt), cold)
    with pytest.warns(PromptCacheWarning, match=f"prompt cache '{bad}' not used"):
        result = generate(model, [prompt], prompt_cache=bad, cache="paged", max_new_tokens=2)
    assert result.cached_tokens == 0
    assert result.generations[0].token_ids == cold.outputs[0].token_ids[:2]


def test_a_file_of_another_model_or_page_size_is_refused(model, saved, tmp_path):
    prompt, _, path = saved
    other = make_engine(Model.tiny(seed=1))
    with pytest.raises(FingerprintMismatchError, match="model_sha256"):
        other.load_prefix(path, prompt)
    pages = Engine(
        model,
        CacheConfig(kind="paged", page_size=8),
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=256),
    )
    with pytest.raises(FingerprintMismatchError, match="page_size"):
        pages.load_prefix(path, prompt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(Model.tiny(seed=1), [prompt], prompt_cache=path, cache="paged", max_new_tokens=1)
    assert any("model_sha256" in str(w.message) for w in caught)
    with pytest.raises(FingerprintMismatchError, match="page_size"):
        make_engine(model, kind="contiguous").load_prefix(path, prompt)
    with pytest.raises(ValueError, match="enable_prefix_caching=False"):
        make_engine(model, enable_prefix_caching=False).load_prefix(path, prompt)


# -- the prefix-cache directory -------------------------------------------------------------


def page_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(PAGE_SUFFIX))


def test_a_restarted_engine_serves_the_prefix_from_disk(model, tmp_path):
    directory = str(tmp_path / "prefixes")
    prompt = tokens(20, 45)
    first = make_engine(model, prefix_cache_dir=directory)
    cold, cold_ran = computed(first, prompt)
    # 50 computed tokens (the prompt and 5 drawn ones): 3 full pages, one chain, one file.
    assert first.persist_prefix_cache() == 3 and len(page_files(directory)) == 1
    assert first.stats().prefix_spilled_pages == 3 and first.backend.directory.num_pages == 3
    assert first.persist_prefix_cache() == 0  # on disk already
    restarted = make_engine(model, prefix_cache_dir=directory)
    warm, warm_ran = computed(restarted, prompt)
    stats = restarted.stats()
    assert warm.num_cached_tokens == 32 and stats.prefix_disk_hit_tokens == 32
    assert warm_ran == cold_ran - 32
    assert stats.prefix_dir_files == 1 and stats.prefix_dir_bytes > 0
    assert_same(warm, cold)
    assert oct(os.stat(os.path.join(directory, KEY_FILE)).st_mode & 0o777) == "0o600"


def test_evicted_pages_spill_to_disk_and_come_back(model, tmp_path):
    directory = str(tmp_path / "spill")
    engine = make_engine(model, prefix_cache_dir=directory)  # 16 pages: 256 tokens
    first = tokens(30, 70)
    cold = run(engine, first)
    assert engine.stats().prefix_spilled_pages == 0
    for seed in range(31, 34):  # enough other prompts to evict every page of the first
        run(engine, tokens(seed, 120))
    assert engine.backend.manager.cached_prefix(first) == ()
    assert engine.stats().prefix_spilled_pages >= 4
    warm, ran = computed(engine, first)
    assert warm.num_cached_tokens == 64 and engine.stats().prefix_disk_hit_tokens >= 64
    assert ran == 70 - 64 + GREEDY.max_tokens - 1
    assert_same(warm, cold)
    engine.backend.manager.check_invariants()


def test_salts_keep_tenants_apart_on_disk(model, tmp_path):
    directory = str(tmp_path / "tenants")
    prompt = tokens(40, 40)
    engine = make_engine(model, prefix_cache_dir=directory)
    run(engine, prompt, salt="tenant-a")
    engine.persist_prefix_cache()
    restarted = make_engine(model, prefix_cache_dir=directory)
    assert run(restarted, prompt, salt="tenant-b").num_cached_tokens == 0
    assert run(restarted, prompt).num_cached_tokens == 0
    assert restarted.stats().prefix_disk_hit_tokens == 0
    assert run(restarted, prompt, salt="tenant-a").num_cached_tokens == 32
    assert restarted.stats().prefix_disk_hit_tokens == 32


def test_damaged_page_files_are_deleted_and_missed(model, tmp_path, caplog):
    directory = str(tmp_path / "damaged")
    prompt = tokens(50, 40)
    engine = make_engine(model, prefix_cache_dir=directory)
    cold = run(engine, prompt)
    engine.persist_prefix_cache()
    (first,) = page_files(directory)
    with open(os.path.join(directory, first), "r+b") as file:
        file.truncate(100)
    restarted = make_engine(model, prefix_cache_dir=directory)
    with caplog.at_level("WARNING", logger="jaxkv.engine.prefix_store"):
        warm = run(restarted, prompt)
    assert warm.num_cached_tokens == 0 and first in caplog.text and "deleted" in caplog.text
    assert page_files(directory) == [] and os.listdir(directory) == [KEY_FILE]
    assert_same(warm, cold)


def test_the_directory_stays_under_its_bound_least_recently_used_first(model, tmp_path):
    directory = str(tmp_path / "bounded")
    engine = make_engine(model, prefix_cache_dir=directory)
    run(engine, tokens(60, 40))
    engine.persist_prefix_cache()
    (older,) = page_files(directory)
    chain_bytes = engine.stats().prefix_dir_bytes
    bounded = make_engine(
        model, prefix_cache_dir=directory, prefix_cache_dir_max_bytes=chain_bytes * 3 // 2
    )
    assert bounded.stats().prefix_dir_files == 1  # it fits
    run(bounded, tokens(61, 40))
    bounded.persist_prefix_cache()
    (newer,) = page_files(directory)
    assert newer != older and bounded.stats().prefix_dir_bytes <= chain_bytes * 3 // 2
    small = make_engine(model, prefix_cache_dir=directory, prefix_cache_dir_max_bytes=1)
    assert small.stats().prefix_dir_files == 0 and page_files(directory) == []


def test_chains_of_pages_evicted_one_by_one_are_restored_across_files(model, tmp_path):
    directory = str(tmp_path / "chains")
    prompt = tokens(70, 90)
    engine = make_engine(model, prefix_cache_dir=directory)
    cold = run(engine, prompt)
    hashes = engine.backend.manager.prefix_hashes(prompt)
    entries = {entry.page_hash: entry for entry in engine.backend.manager.cached_pages()}
    store = engine.backend.directory
    # Spilled in three batches, tail first as the LRU evicts: three files.
    for batch in ([hashes[4]], [hashes[2], hashes[3]], [hashes[0], hashes[1]]):
        store.spill(engine.backend.cache, [entries[h] for h in batch])
    assert len(page_files(directory)) == 3 and store.num_pages == 5
    restarted = make_engine(model, prefix_cache_dir=directory)
    warm = run(restarted, prompt)
    assert warm.num_cached_tokens == 80 and restarted.stats().prefix_disk_hit_tokens == 80
    assert_same(warm, cold)


def test_the_directory_needs_the_paged_prefix_cache(tmp_path):
    with pytest.raises(ValueError, match="prefix_cache_dir"):
        CacheConfig(kind="contiguous", prefix_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="prefix_cache_dir"):
        CacheConfig(enable_prefix_caching=False, prefix_cache_dir=str(tmp_path))
    assert CacheConfig(prefix_cache_dir=tmp_path).prefix_cache_dir == str(tmp_path)
