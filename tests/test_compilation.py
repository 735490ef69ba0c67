"""The persistent compilation cache: where it goes, turning it off, and two processes filling
one directory at once, then a third run that compiles nothing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from jaxkv import compilation

# A tiny model's generation in a fresh process; JAX logs each persistent-cache hit.
_RUN = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
for name in list(logging.root.manager.loggerDict) + ["jax"]:
    logging.getLogger(name).setLevel(logging.WARNING)
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
from jaxkv.engine import Model, generate
result = generate(Model.tiny(), ["Hello there"], max_new_tokens=3, ignore_eos=True)
print(len(result.generations[0].token_ids))
"""


def _spawn(directory: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, compilation.ENVIRONMENT_VARIABLE: str(directory)}
    return subprocess.Popen(
        [sys.executable, "-c", _RUN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert out.strip() == "3"
    return err


def test_two_processes_share_a_directory_and_a_third_compiles_nothing(tmp_path):
    directory = tmp_path / "xla"
    first, second = _spawn(directory), _spawn(directory)  # both cold, at the same time
    _finish(first)
    _finish(second)
    entries = [p.name for p in directory.iterdir() if p.name.endswith("-cache")]
    assert any(name.startswith("jit_forward_step-") for name in entries), entries
    log = _finish(_spawn(directory))
    assert "Persistent compilation cache hit for 'jit_forward_step'" in log
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit_forward_step'" not in log


def test_directory_settings(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.cache_directory() == tmp_path / "jaxkv" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation.cache_directory() == tmp_path / "home" / ".cache" / "jaxkv" / "xla"
    for off in ("off", "0", "False", " none "):
        monkeypatch.setenv(compilation.ENVIRONMENT_VARIABLE, off)
        assert compilation.cache_directory() is None
    monkeypatch.setenv(compilation.ENVIRONMENT_VARIABLE, str(tmp_path / "mine"))
    assert compilation.cache_directory() == tmp_path / "mine"
    assert compilation.cache_directory("off") is None
    with pytest.raises(TypeError, match="setting must be a str or None, got int"):
        compilation.cache_directory(3)
    with pytest.raises(ValueError, match="max_bytes must be a positive int, got 0"):
        compilation.enable_compilation_cache(max_bytes=0)


def test_off_leaves_jax_without_a_cache(tmp_path):
    env = {**os.environ, compilation.ENVIRONMENT_VARIABLE: "off"}
    code = (
        "import jax; from jaxkv.compilation import enable_compilation_cache as e; "
        "print(e(), jax.config.jax_compilation_cache_dir)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["None", "None"]
