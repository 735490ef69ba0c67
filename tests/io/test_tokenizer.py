"""GGUF tokenizer: parity with HF's tokenizer, chat template, streaming decoder, errors."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jinja2.exceptions
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.io.gguf import default_model_path, read_gguf_metadata
from jaxkv.io.tokenizer import StreamDecoder, Tokenizer, TokenizerError

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def meta():
    return read_gguf_metadata(default_model_path())


@pytest.fixture(scope="module")
def tokenizer(meta) -> Tokenizer:
    return Tokenizer.from_metadata(meta)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "reference.json").read_text(encoding="utf-8"))


# -- parity with HF -----------------------------------------------------------------------


def test_prompt_ids_match_hf(tokenizer, reference):
    assert [p["name"] for p in reference["prompts"]] == ["short", "long", "chat"]
    for prompt in reference["prompts"]:
        assert tokenizer.encode(prompt["text"]) == prompt["prompt_ids"], prompt["name"]
    assert 250 <= reference["prompts"][1]["num_prompt_tokens"] <= 350


def test_generated_text_decodes_like_hf(tokenizer, reference):
    for prompt in reference["prompts"]:
        assert tokenizer.decode(prompt["generated_ids"]) == prompt["generated_text"]


def test_tricky_strings_match_hf(tokenizer, reference):
    cases = reference["tokenizer_cases"]
    assert len(cases) >= 10
    for case in cases:
        ids = tokenizer.encode(case["text"])
        assert ids == case["ids"], repr(case["text"])
        assert tokenizer.decode(ids) == case["decoded"], repr(case["text"])


def test_perplexity_text_ids_match_hf(tokenizer, reference):
    text = (DATA / reference["perplexity"]["file"]).read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert ids == reference["perplexity"]["ids"]
    assert len(ids) >= 600


def test_chat_template_matches_hf(tokenizer, reference):
    chat = reference["prompts"][2]
    assert tokenizer.apply_chat_template(chat["messages"]) == chat["text"]
    for case in reference["chat_template_cases"]:
        rendered = tokenizer.apply_chat_template(
            case["messages"], add_generation_prompt=case["add_generation_prompt"]
        )
        assert rendered == case["text"]


def test_special_tokens(tokenizer, reference):
    special = reference["special_tokens"]
    assert tokenizer.bos_token == special["bos"] == "<|im_start|>"
    assert tokenizer.eos_token == special["eos"] == "<|im_end|>"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (2, 0)
    assert tokenizer.special_tokens["<|im_start|>"] == 1
    assert tokenizer.special_tokens["<|endoftext|>"] == 0
    assert len(tokenizer.special_tokens) == 17
    assert tokenizer.eos_token_ids == {0, 2}
    assert tokenizer.vocab_size == 49152
    assert tokenizer.add_bos is False
    assert tokenizer.id_to_token(19556) == "Hello"
    assert tokenizer.token_to_id("Ġworld") == 905
    assert tokenizer.token_to_id("no such token here") is None


def test_add_bos(tokenizer):
    assert tokenizer.encode("Hello world") == [19556, 905]
    assert tokenizer.encode("Hello world", add_bos=True) == [1, 19556, 905]


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_decode_accepts_numpy_ids(tokenizer):
    ids = np.array(tokenizer.encode("café"), dtype=np.int32)
    assert tokenizer.decode(ids) == "café"
    assert tokenizer.decode(list(ids)) == "café"


# Code points whose UTF-8 bytes all have tokens in SmolLM2's vocabulary (see below).
REPRESENTABLE = st.characters(
    max_codepoint=0x3FFFF, exclude_categories=["Cs"], exclude_characters="\x04\x06\x13\x14\x16\x1d"
)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=REPRESENTABLE, max_size=40))
def test_encode_decode_is_lossless(tokenizer, text):
    assert tokenizer.missing_bytes.isdisjoint(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bytes_without_a_token_are_dropped_like_hf(tokenizer):
    # SmolLM2's vocabulary has no token for byte 0x04 or 0xF1 (HF gives the same ids).
    assert {0x04, 0xF1} <= tokenizer.missing_bytes
    assert tokenizer.encode("a\x04b") == [81, 82]
    assert tokenizer.encode("\U00040000") == [218, 218, 218]
    assert tokenizer.decode(tokenizer.encode("caf\u00e9 \U0001f600")) == "caf\u00e9 \U0001f600"


# -- streaming ------------------------------------------------------------------------------


def test_stream_holds_back_partial_characters(tokenizer):
    text = "Wet 🌧️ day, 日本語 ok"
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder()
    chunks = []
    held_back = 0
    for token_id in ids:
        chunk = decoder.feed(token_id)
        assert "\ufffd" not in chunk
        if decoder.pending_bytes:
            held_back += 1
        chunks.append(chunk)
    assert held_back > 0, "no multi-byte character was split across tokens"
    assert "".join(chunks) + decoder.flush() == text
    assert decoder.ids == ids


def test_stream_emoji_split_over_two_tokens(tokenizer):
    first, second = tokenizer.encode(" 😀")
    decoder = StreamDecoder(tokenizer)
    assert decoder.feed(first) == " "
    assert decoder.pending_bytes == 3
    assert decoder.feed(second) == "😀"
    assert decoder.pending_bytes == 0


def test_stream_flush_reports_unfinished_character(tokenizer):
    first, _ = tokenizer.encode(" 😀")
    decoder = tokenizer.stream_decoder()
    assert decoder.feed([first]) == " "
    assert decoder.flush() == "\ufffd"
    assert decoder.pending_bytes == 0
    assert decoder.feed(tokenizer.encode("ok")) == "ok"


def test_stream_skips_special_tokens(tokenizer):
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    out = "".join(decoder.feed(i) for i in tokenizer.encode("hi<|im_end|>"))
    assert out == "hi"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=30))
def test_stream_concatenation_equals_decode(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    streamed = "".join(decoder.feed(i) for i in ids) + decoder.flush()
    assert streamed == tokenizer.decode(ids)


# -- errors ---------------------------------------------------------------------------------


def test_encode_decode_errors(tokenizer):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenizer.encode(b"hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add_bos must be a bool or None"):
        tokenizer.encode("hi", add_bos=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ids\[1\] must be in \[0, 49152\), got 49152"):
        tokenizer.decode([5, 49152])
    with pytest.raises(TypeError, match=r"ids\[0\] must be an int, got str"):
        tokenizer.decode(["a"])
    with pytest.raises(TypeError, match="ids must be a sequence of ints"):
        tokenizer.decode("abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_id must be in"):
        tokenizer.id_to_token(-1)
    with pytest.raises(ValueError, match=r"ids\[0\] must be in"):
        tokenizer.stream_decoder().feed(-3)
    with pytest.raises(TypeError, match="tokenizer must be a Tokenizer"):
        StreamDecoder("not a tokenizer")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        (
            b"caf\xe9 au lait".decode("utf-8", "surrogateescape"),
            r"3 .*U\+DCE9 \(the undecodable input byte 0xE9\)",
        ),
        ("lone \ud83d half of an emoji", r"5 holds the lone surrogate U\+D83D$"),
    ],
)
def test_text_that_is_not_utf8(tokenizer, text, detail):
    """What `sys.stdin` with errors="surrogateescape" makes of Latin-1 input, say."""
    with pytest.raises(ValueError, match=rf"^text must be valid UTF-8 text, but position {detail}"):
        tokenizer.encode(text)
    with pytest.raises(
        ValueError, match=r"^messages\[1\]\['content'\] must be valid UTF-8 text, but position"
    ):
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "ok"}, {"role": "user", "content": text}]
        )


def test_chat_template_errors(tokenizer):
    with pytest.raises(TypeError, match="messages must be a list of dicts"):
        tokenizer.apply_chat_template("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict"):
        tokenizer.apply_chat_template(["hello"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] must be a str"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]
        )
    with pytest.raises(TypeError, match="add_generation_prompt must be a bool"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}], "yes")


def _tokenizer_with(meta, **fields) -> Tokenizer:
    return Tokenizer.from_metadata(dataclasses.replace(meta, fields={**meta.fields, **fields}))


def test_template_is_sandboxed(meta):
    sneaky = _tokenizer_with(
        meta, **{"tokenizer.chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    )
    with pytest.raises(TokenizerError, match="chat template error: SecurityError") as info:
        sneaky.apply_chat_template([{"role": "user", "content": "x"}])
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)
    raising = _tokenizer_with(
        meta, **{"tokenizer.chat_template": "{{ raise_exception('roles must alternate') }}"}
    )
    with pytest.raises(TokenizerError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(meta):
    fields = {k: v for k, v in meta.fields.items() if k != "tokenizer.chat_template"}
    bare = Tokenizer.from_metadata(dataclasses.replace(meta, fields=fields))
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_unsupported_tokenizer_metadata(meta):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model is 'llama'"):
        _tokenizer_with(meta, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="pre_tokenizer 'mystery'"):
        _tokenizer_with(meta, **{"tokenizer.ggml.pre": "mystery"})
    fields = {k: v for k, v in meta.fields.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(TokenizerError, match="'tokenizer.ggml.merges' is missing"):
        Tokenizer.from_metadata(dataclasses.replace(meta, fields=fields))
    with pytest.raises(TokenizerError, match="bos_token_id must be in"):
        _tokenizer_with(meta, **{"tokenizer.ggml.bos_token_id": 10**6})
    with pytest.raises(TypeError, match="meta must be a GGUFMetadata"):
        Tokenizer.from_metadata({})  # type: ignore[arg-type]


def test_constructor_validation():
    with pytest.raises(TokenizerError, match="merge #0 must be 'left right'"):
        Tokenizer(["a", "b", "ab"], ["ab"])
    with pytest.raises(TokenizerError, match="token_types must have one entry per token"):
        Tokenizer(["a", "b"], [], [1])
    with pytest.raises(TokenizerError, match="tokens must be a non-empty sequence"):
        Tokenizer([], [])


def test_small_vocabulary_from_scratch():
    """A hand-made vocabulary: merges apply in priority order, control tokens stay whole."""
    tokens = ["<s>", "a", "b", "Ġ", "ab", "Ġab"]
    tokenizer = Tokenizer(
        tokens, ["a b", "Ġ ab"], [3, 1, 1, 1, 1, 1], bos_token_id=0, eos_token_id=0
    )
    assert tokenizer.encode("ab ab<s>") == [4, 5, 0]
    assert tokenizer.decode([4, 5, 0]) == "ab ab<s>"
    assert tokenizer.encode("ab", add_bos=True) == [0, 4]
    assert tokenizer.eos_token_ids == {0}
