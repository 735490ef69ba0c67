"""Engine, ``generate`` and CLI checks on 8 devices: run by ``test_engine_mesh.py`` in a process
of its own, started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

The bundled SmolLM2-135M generates on a 2x4 (data x tensor) mesh, contiguous and paged, the
greedy tokens it generates on one device (its 9 heads and 3 KV heads do not divide over 4
devices: they are replicated by the explicit ``indivisible="replicate"``, while its MLP and the
contiguous rows are split); a small Llama whose heads divide runs fully split and its decode step
gathers no cache array; every cache array keeps its declared sharding through steps and row
operations; ``jaxkv generate --mesh`` prints the single-device tokens and ``jaxkv serve
--mesh`` completes a prompt as one device does.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxkv.engine import (
    CacheConfig,
    HybridModel,
    Model,
    SamplingParams,
    SchedulerConfig,
    generate,
)
from jaxkv.engine.backends import make_backend
from jaxkv.engine.generate import generate_engine
from jaxkv.engine.placement import make_mesh
from jaxkv.engine.step import compiled_forward, forward_step

assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

PROMPTS = ["The capital of France is", "A cache is"]
NEW_TOKENS = 8
MESH = make_mesh("data=2,tensor=4")


@functools.cache
def smollm2() -> Model:
    return Model.load()


@functools.cache
def tiny() -> Model:
    return Model.tiny(num_heads=8, num_kv_heads=4, hidden_size=64)


@functools.cache
def reference(name: str, cache: str) -> tuple[tuple[int, ...], ...]:
    """The greedy tokens of ``PROMPTS`` on one device."""
    model = smollm2() if name == "smollm2" else tiny()
    result = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, cache=cache, warmup=False)
    return tuple(tuple(g.token_ids) for g in result.generations)


def on_mesh(name: str, cache: str, indivisible: str):
    """An engine sized as ``generate`` sizes it for ``PROMPTS``, on ``MESH``."""
    model = smollm2() if name == "smollm2" else tiny()
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    return generate_engine(model, ids, NEW_TOKENS, cache=cache, mesh=MESH, indivisible=indivisible)


def tokens_of(outputs) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(choice.token_ids) for out in outputs for choice in out.outputs)


def assert_placed(engine) -> None:
    """Every cache array of an engine's (or a backend's) cache carries the sharding
    ``jaxkv.sharding`` declares for it."""
    backend = getattr(engine, "backend", engine)
    cache = backend.cache
    declared = backend.placement.cache_shardings(cache)
    pairs = zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(declared), strict=True)
    for leaf, want in pairs:
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)


def spec(engine, leaf) -> PartitionSpec:
    sharding_ = leaf.sharding
    assert isinstance(sharding_, NamedSharding) and sharding_.mesh == engine.mesh
    return sharding_.spec


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_smollm2_on_a_2x4_mesh_generates_the_single_device_tokens(cache):
    with pytest.raises(ValueError, match=r"'heads' has size 9 .*--mesh-indivisible replicate"):
        on_mesh("smollm2", cache, "error")
    engine = on_mesh("smollm2", cache, "replicate")
    layer = engine.model.params["layers"][0]
    assert spec(engine, layer["wq"]) == spec(engine, layer["wk"]) == PartitionSpec()
    assert spec(engine, layer["w_up"]) == PartitionSpec(None, "tensor")
    assert spec(engine, layer["w_down"]) == PartitionSpec("tensor")
    greedy = SamplingParams(max_tokens=NEW_TOKENS)
    got = tokens_of(engine.generate(PROMPTS, greedy))
    assert got == reference("smollm2", cache)
    assert_placed(engine)
    keys = engine.backend.cache[0]
    if cache == "contiguous":  # rows over data; the 3 KV heads held whole
        assert spec(engine, keys.keys) == PartitionSpec("data")
        # Two choices forked from one prompt (a row copy) give its tokens twice.
        forked = tokens_of(engine.generate(PROMPTS[:1], SamplingParams(max_tokens=4, n=2)))
        assert forked == (got[0][:4],) * 2
        assert_placed(engine)
    else:  # a pool is replicated over data, and its 3 KV heads over tensor
        assert spec(engine, keys.key_pages) == PartitionSpec()


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_divisible_heads_are_split_and_a_decode_step_gathers_no_cache(cache):
    engine = on_mesh("tiny", cache, "error")
    got = tokens_of(engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS)))
    assert got == reference("tiny", cache)
    assert_placed(engine)
    backend = engine.backend
    view = backend.cache[0]
    if cache == "contiguous":
        assert spec(engine, view.keys) == PartitionSpec("data", None, "tensor")
        assert spec(engine, view.lengths) == PartitionSpec("data")
        # A rollback (truncation) keeps the placement and cuts the row.
        lengths = np.asarray(view.lengths)
        backend.to_truncate = {0: 3}
        backend._flush()
        assert_placed(engine)
        assert np.asarray(backend.cache[0].lengths).tolist() == [3, *lengths[1:].tolist()]
        rows = backend.rows
        args = backend._inputs(np.zeros((rows, 1), np.int32), np.zeros(rows, np.int32), False)
    else:
        assert spec(engine, view.key_pages) == PartitionSpec(None, "tensor")
        args = _decode_args(backend, backend.rows)  # the decode step of every row
    compiled, seconds = compiled_forward(
        engine.model.config, *args, step=forward_step, keep_cache_sharding=True
    )
    assert seconds == 0.0, "the engine compiled this decode step already"
    gathered = gathered_shapes(compiled.as_text())
    cache_shapes = {tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(backend.cache)}
    assert not gathered & cache_shapes, gathered & cache_shapes


def _decode_args(backend, tokens):
    """The arguments of a paged decode step of ``tokens`` tokens."""
    from jaxkv.engine.step_inputs import paged_runtime
    from jaxkv.pages import PageManager

    manager = PageManager(
        backend.metadata.num_pages,
        backend.metadata.page_size,
        backend.rows,
        backend.metadata.max_pages_per_seq,
        token_buckets=[tokens],
    )
    manager.add_sequence("probe", [0])
    runtime = paged_runtime(manager.schedule([("probe", 1)]), num_tokens=tokens, max_query_len=1)
    return backend._inputs(runtime, 1)


_GATHER = re.compile(r"=\s*\(?([^=]*?)\)?\s+all-gather(?:-start)?\(")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
    """The result shapes of every all-gather in ``hlo``."""
    return {
        tuple(int(d) for d in dims.split(",") if d)
        for match in _GATHER.finditer(hlo)
        for dims in _SHAPE.findall(match.group(1))
    }


def test_cli_generate_on_a_2x4_mesh(monkeypatch, capsys):
    from jaxkv.cli import main

    model = smollm2()
    monkeypatch.setattr(Model, "load", classmethod(lambda cls, path=None, dtype="float32": model))
    argv = ["generate", "--mesh", "data=2,tensor=4", "--raw", "--json", "--quiet"]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--cache", "contiguous", *PROMPTS]
    assert main([*argv, "--mesh-indivisible", "replicate"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert tuple(tuple(r["token_ids"]) for r in records) == reference("smollm2", "contiguous")
    assert main(argv) == 1  # indivisible heads refused by default, with the way out named
    assert "--mesh-indivisible replicate" in capsys.readouterr().err
    assert main(["generate", "--mesh", "data=2,tensor=2", "hi"]) == 2
    assert "spans 4 devices, but 8 are available" in capsys.readouterr().err


def test_hybrid_stack_on_a_2x4_mesh_generates_the_single_device_tokens():
    """Attention, Mamba2 and linear-attention layers (2 KV heads: held whole on tensor=4)."""
    model = HybridModel.tiny()
    want = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, warmup=False)
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    with pytest.raises(ValueError, match=r"'kv_heads' has size 2 .*--mesh-indivisible replicate"):
        generate_engine(model, ids, NEW_TOKENS, mesh=MESH)
    engine = generate_engine(model, ids, NEW_TOKENS, mesh=MESH, indivisible="replicate")
    got = tokens_of(engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS)))
    assert got == tuple(tuple(g.token_ids) for g in want.generations)
    assert_placed(engine)


def test_the_default_pool_is_sized_by_what_one_device_holds_of_a_page():
    """4 KV heads over tensor=4: each device holds a quarter of every page, so a memory budget
    of 40 pages buys the mesh 160 (capped at what 2 rows of 1,024 tokens need: 2 x 65)."""
    model = tiny()
    engine = on_mesh("tiny", "paged", "error")
    page = engine.backend.metadata.bytes_per_page()
    config = CacheConfig(kind="paged", memory_bytes=40 * page)
    scheduler = SchedulerConfig(max_num_seqs=2, max_model_len=1024)
    one = make_backend(model, config, scheduler, 1024)
    split = make_backend(model, config, scheduler, 1024, 0, engine.placement)
    assert one.manager.num_pages == 65  # at least one sequence and a copy-on-write page
    assert split.manager.num_pages == 130
    assert engine.placement.per_device_bytes(split.metadata) == 130 * page // 4
    assert_placed(split)


def test_serve_on_a_2x4_mesh_completes_as_one_device_does(monkeypatch):
    import threading
    import time

    import httpx
    import uvicorn

    from jaxkv.cli import main
    from jaxkv.engine import Engine

    model = tiny()
    scheduler = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=128)
    single = Engine(model, CacheConfig(kind="paged"), scheduler)
    want = single.generate(["A cache is"], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(want[0].outputs[0].token_ids) == 6
    monkeypatch.setattr(Model, "load", classmethod(lambda cls, path=None, dtype="float32": model))
    servers: list[uvicorn.Server] = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    argv = ["serve", "--mesh", "data=2,tensor=4", "--port", "0", "--max-num-seqs", "2"]
    argv += ["--max-num-batched-tokens", "32", "--max-model-len", "128"]
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not (servers and servers[0].started):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    server = servers[0]
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        body = {"prompt": "A cache is", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want[0].outputs[0].text
    finally:
        server.should_exit = True
        thread.join(60)
    assert status == [0]
