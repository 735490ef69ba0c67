"""Fixtures shared by the tests of the ``jaxkv`` command: the bundled model loaded once, a
``Model.load`` that hands it out instead of reading the file again, and one that refuses to
read anything (to prove an argument was checked before any loading), and a record of the
chat sessions a command creates."""

from __future__ import annotations

import pytest

import jaxkv.engine
from jaxkv.engine import ChatSession, Model


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
