"""Fixtures shared by the tests of the ``jaxkv`` command: the bundled model loaded once, a
``Model.load`` that hands it out instead of reading the file again, and one that refuses to
read anything (to prove an argument was checked before any loading), a record of the
chat sessions a command creates, and a bound on the compiled functions a test worker keeps."""

from __future__ import annotations

import gc
import os

import jax
import pytest

import jaxkv.engine
from jaxkv.engine import ChatSession, Model

RELEASE_ABOVE_BYTES = 6 * 2**30
"""A test worker past this resident size drops JAX's compiled functions after its current test
file: a worker runs many files, and their executables pile up until two workers and the
processes their tests start no longer fit in memory. Below it nothing is dropped, since files
share many compiled shapes, and compiling them again after every file made the suite twice as
slow."""


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: never drop


@pytest.fixture(scope="module", autouse=True)
def _bounded_compiled_functions():
    yield
    if _resident_bytes() > RELEASE_ABOVE_BYTES:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def cli_model() -> Model:
    return Model.load()


@pytest.fixture
def cached_model(monkeypatch, cli_model) -> Model:
    """``Model.load`` returns the already loaded bundled model."""
    monkeypatch.setattr(
        Model, "load", classmethod(lambda cls, path=None, dtype="float32": cli_model)
    )
    return cli_model


@pytest.fixture
def no_loading(monkeypatch) -> None:
    """Fail the test if the command reads a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was read before the arguments were checked")

    monkeypatch.setattr(Model, "load", classmethod(refuse))
    monkeypatch.setattr("jaxkv.io.gguf.read_gguf_metadata", refuse)
    monkeypatch.setattr("jaxkv.io.gguf.load_gguf", refuse)


@pytest.fixture
def sessions(monkeypatch) -> list[ChatSession]:
    """Every ChatSession the command creates."""
    created: list[ChatSession] = []

    class Recorded(ChatSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(jaxkv.engine, "ChatSession", Recorded)
    return created
