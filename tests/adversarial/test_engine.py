"""Hostile input to generation with the real bundled model: ``generate`` and ``ChatSession``
refuse bad arguments with an error naming them before any work, read generators once and use
them, and a refused turn leaves a conversation as it was."""

from __future__ import annotations

import pytest

from jaxkv.engine import ChatSession, Model, SamplingParams, generate


@pytest.fixture(scope="module")
def model():
    return Model.load()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(prompts="hello"), ValueError, "prompts must be a non-empty list"),
        (dict(prompts=[]), ValueError, "prompts must be a non-empty list"),
        (dict(prompts=(p for p in ["hi"])), ValueError, "prompts must be a non-empty list"),
        (dict(prompts=[[]]), ValueError, r"prompts\[0\] is empty"),
        (dict(prompts=[[1, -1]]), ValueError, r"token ids outside \[0, 49152\)"),
        (dict(prompts=[[1, 10**6]]), ValueError, r"token ids outside \[0, 49152\)"),
        (dict(prompts=[[1, 2.0]]), ValueError, r"token ids outside"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
        (dict(max_new_tokens=10**6), ValueError, "exceeds the model's context"),
        (dict(temperature=float("nan")), ValueError, "temperature must be >= 0"),
        (dict(temperature=-0.5), ValueError, "temperature must be >= 0"),
        (dict(top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
        (dict(top_k=0), ValueError, "top_k must be >= 1, got 0"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(page_size=0), ValueError, "page_size must be >= 1, got 0"),
        (dict(page_size=True), TypeError, "page_size must be an int"),
        (dict(cache="ring"), ValueError, "cache must be one of"),
        (dict(kv_quantization="int3"), ValueError, "kv_quantization must be one of"),
        (dict(stop="abc"), ValueError, "stop must be a list of non-empty strings"),
        (dict(stop=[""]), ValueError, "stop must be a list of non-empty strings"),
        (dict(stop=5), ValueError, "stop must be a list of non-empty strings"),
    ],
)
def test_generate_refuses_bad_arguments(model, kwargs, error, match):
    arguments = dict(prompts=["Hello"], max_new_tokens=2)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        generate(model, **arguments)


def test_a_stop_generator_is_read_once_and_used(model):
    prompt = ["List three colours, separated by commas:"]
    stops = [" ", "\n"]
    listed = generate(model, prompt, max_new_tokens=24, stop=stops)
    generated = generate(model, prompt, max_new_tokens=24, stop=(s for s in stops))
    assert listed.generations[0].finish_reason == "stop"
    assert generated.generations[0].text == listed.generations[0].text
    assert generated.generations[0].finish_reason == "stop"


def test_chat_refuses_bad_turns_and_keeps_the_conversation(model):
    chat = ChatSession(model, max_length=96, sampling=SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        chat.send("Hi", max_new_tokens=0)
    with pytest.raises(TypeError, match="text must be a str"):
        chat.send(b"Hi")
    first = chat.send("Say one word.", max_new_tokens=4)
    messages, cached = list(chat.messages), list(chat.cached_ids)
    with pytest.raises(ValueError, match="would pass the cache's max_length=96"):
        chat.send("word " * 200, max_new_tokens=4)
    assert chat.messages == messages and chat.cached_ids == cached
    assert chat.send("Say one word.", max_new_tokens=4)  # the session still works
    assert first
    with pytest.raises(ValueError, match="max_length must be >= 16"):
        ChatSession(model, max_length=8)
