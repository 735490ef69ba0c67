"""The engine, ``generate`` and the CLI on a device mesh: ``--mesh`` parsing and its usage
errors, the engine's refusals, ``jaxkv info --mesh``, all in this process; the 8-device checks
(``_engine_mesh_checks.py``: SmolLM2 on a 2x4 mesh generates the single-device tokens, contiguous
and paged, every cache array stays placed) in a process of their own, one for all of them."""

from __future__ import annotations

import pathlib

import pytest

from jaxkv import sharding
from jaxkv._arguments import MESH_AXES, parse_mesh_spec
from jaxkv.cli import main
from jaxkv.engine import CacheConfig, Engine, Model, SchedulerConfig
from jaxkv.engine.placement import make_mesh
from jaxkv.memory import kv_mesh_rows, sizing_mesh

CHECKS = pathlib.Path(__file__).with_name("_engine_mesh_checks.py")


def test_mesh_specs_parse_into_named_sizes():
    assert MESH_AXES == sharding.STANDARD_MESH_AXES
    assert parse_mesh_spec("data=2,tensor=4") == (("data", 2), ("tensor", 4))
    assert parse_mesh_spec(" tensor = 8 ") == (("tensor", 8),)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected name=size"),
        ("data:2", "expected name=size entries"),
        ("=2", "expected name=size entries"),
        ("data=2,model=4", "unknown mesh axis 'model'; expected one of ('data', 'tensor')"),
        ("data=2,data=4", "mesh axis 'data' is given twice"),
        ("data=0", "mesh axis 'data' needs a positive integer size, got '0'"),
        ("tensor=-1", "needs a positive integer size, got '-1'"),
        ("data=two", "needs a positive integer size, got 'two'"),
    ],
)
def test_bad_mesh_specs_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_mesh_spec(spec)


def test_a_mesh_must_span_every_device():
    mesh = make_mesh("data=1")  # this process has one device
    assert dict(mesh.shape) == {"data": 1}
    with pytest.raises(ValueError, match=r"data=2,tensor=4 spans 8 devices, but 1 are available"):
        make_mesh("data=2,tensor=4")


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data=2,tensor=4", "argument --mesh: mesh data=2,tensor=4 spans 8 devices, but 1 are"),
        ("rows=2", "argument --mesh: unknown mesh axis 'rows'"),
        ("data=2,", "argument --mesh: expected name=size entries"),
    ],
)
def test_cli_mesh_usage_errors_exit_2_before_loading(capsys, no_loading, command, spec, message):
    assert main([command, "--mesh", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxkv {command}: error: {message}"), err
    assert err.count("\n") == 1


def test_engine_refuses_rows_that_do_not_divide_over_data():
    model = Model.tiny()
    mesh = sizing_mesh((("data", 2),))  # the check comes before anything is placed
    scheduler = SchedulerConfig(max_num_seqs=3, max_model_len=64)
    with pytest.raises(ValueError, match=r"max_num_seqs=3 rows do not divide over mesh axes "):
        Engine(model, CacheConfig(kind="contiguous"), scheduler, mesh=mesh)
    with pytest.raises(ValueError, match=r"sharding_rules needs a mesh"):
        Engine(model, sharding_rules=sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"indivisible must be one of"):
        Engine(model, mesh=make_mesh("data=1"), indivisible="gather")


def test_info_reports_per_device_kv_bytes(capsys):
    assert main(["info", "--mesh", "data=2,tensor=4", "--max-length", "1024"]) == 0
    out = capsys.readouterr().out
    assert "KV cache memory on a mesh of data=2, tensor=4 (8 sequences of 1024 tokens" in out
    # SmolLM2: 30 layers x 3 KV heads x 64 x (K + V) x 4 bytes = 46,080 bytes per token.
    total = 8 * 1024 * 46_080
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("  contig")}
    assert f"{total / 2**20:,.2f} MiB" in lines["float32"]
    assert f"{total / 2 / 2**20:,.2f} MiB" in lines["float32"]  # rows split over data=2
    assert "one float32 page: 737,280 bytes in all, 737,280 per device" in out
    assert "held whole on every device (--mesh-indivisible replicate): logical axis " in out


def test_per_device_page_bytes_follow_the_tensor_split():
    from jaxkv.io.gguf import config_from_metadata, default_model_path, read_gguf_metadata

    config = config_from_metadata(read_gguf_metadata(default_model_path()))
    mesh = sizing_mesh((("data", 2), ("tensor", 3)))  # SmolLM2's 3 KV heads divide over 3
    rows, page, page_device, notes = kv_mesh_rows(config, 256, 4, mesh)
    assert page == 737_280 and page_device == page // 3 and not notes
    shares = {name: per_device / total for name, total, per_device in rows}
    assert shares["paged float32"] == pytest.approx(1 / 3)
    assert shares["contiguous float32"] == pytest.approx(1 / 6, rel=1e-3)


def test_engine_generate_and_cli_on_8_devices(on_8_devices):
    output = on_8_devices(CHECKS, timeout=900)
    assert "8 passed" in output, output


def test_serve_refuses_a_mesh_over_several_processes(capsys, no_loading, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert main(["serve", "--mesh", "data=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxkv serve: error: argument --mesh: this is one of 2 processes"), err
