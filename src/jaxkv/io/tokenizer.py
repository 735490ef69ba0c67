"""Byte-level BPE tokenizer, chat template and streaming detokenizer read from a GGUF file.

The vocabulary, merges, special-token ids and chat template all come from the
GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``); the BPE
itself runs in the `tokenizers` package. Nothing is downloaded. Only the
``gpt2`` (byte-level BPE) tokenizer model is supported, which covers SmolLM2,
Llama-3 and most BPE Llama-family checkpoints.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxkv.io.gguf import GGUFMetadata, default_model_path, read_gguf_metadata

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerError"]

# GGUF token types (llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4

# Text is split into words before BPE. GPT-2's rule is the ByteLevel pre-tokenizer's
# built-in regex; Llama-3 vocabularies were learned with a different split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_GPT2_DIGITS_PRE = ("smollm", "starcoder", "refact")  # GPT-2 split after isolating each digit
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx")

# Control tokens that end a turn in common chat formats; generation stops on any present.
_END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
)


class TokenizerError(ValueError):
    """The GGUF tokenizer metadata is missing or describes an unsupported tokenizer."""


@functools.cache
def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character.

    Bytes that are already printable (and not a space) stand for themselves;
    the remaining ones take code points 256, 257, ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code)
            next_code += 1
    return mapping


@functools.cache
def _char_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in _byte_to_char().items()}


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


def _to_json(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class Tokenizer:
    """Byte-level BPE tokenizer of a GGUF checkpoint.

    Build it with `Tokenizer.from_gguf(path)` or `Tokenizer.from_metadata(meta)`.

    Attributes:
      vocab_size: number of token ids.
      bos_token_id, eos_token_id, unk_token_id, pad_token_id: ids from the GGUF
        metadata (None when the file does not name one).
      eos_token_ids: frozenset of ids that end generation: the EOS id, any
        end-of-turn/end-of-message ids in the metadata, and the control tokens
        among ``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``, ``<|eom_id|>``,
        ``<|end|>``, ``<end_of_turn>`` present in the vocabulary.
      special_tokens: text -> id of every control / user-defined token.
      add_bos: whether `encode` prepends BOS by default
        (``tokenizer.ggml.add_bos_token``).
      chat_template: the Jinja chat template, or None.
      missing_bytes: byte values that no token stands for. `encode` drops them
        (as HF's tokenizer for the same file does), so text containing them does
        not survive ``decode(encode(text))``.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        pre_tokenizer: str | None = None,
    ) -> None:
        """Build from raw vocabulary data.

        Args:
          tokens: token strings, spelled in GPT-2's byte alphabet; index = id.
          merges: BPE merges, each ``"left right"``, highest priority first.
          token_types: GGUF token type per id (3 control, 4 user-defined, ...);
            None treats every token as normal.
          bos_token_id, eos_token_id, unk_token_id, pad_token_id: special ids or None.
          extra_eos_token_ids: further ids that end generation.
          add_bos: default of `encode`'s ``add_bos``.
          chat_template: Jinja template for `apply_chat_template`, or None.
          pre_tokenizer: GGUF ``tokenizer.ggml.pre`` name selecting how text is
            split before BPE (None means GPT-2's split).

        Raises:
          TokenizerError: inconsistent inputs or an unsupported pre-tokenizer.
        """
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _BackendTokenizer

        if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
            raise TokenizerError(f"tokens must be a non-empty sequence of str, got {tokens!r:.80}")
        if isinstance(merges, str) or not isinstance(merges, Sequence):
            raise TokenizerError(f"merges must be a sequence of str, got {type(merges).__name__}")
        vocab_size = len(tokens)
        if token_types is None:
            token_types = [1] * vocab_size
        if len(token_types) != vocab_size:
            raise TokenizerError(
                f"token_types must have one entry per token ({vocab_size}), got {len(token_types)}"
            )
        for name, value in (
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
            ("unk_token_id", unk_token_id),
            ("pad_token_id", pad_token_id),
        ):
            if value is not None and not 0 <= int(value) < vocab_size:
                raise TokenizerError(f"{name} must be in [0, {vocab_size}), got {value}")

        alphabet = set(_char_to_byte())
        special_ids = [
            i for i, kind in enumerate(token_types) if int(kind) in (_CONTROL, _USER_DEFINED)
        ]
        special_set = set(special_ids)
        vocab: dict[str, int] = {}
        for token_id, token in enumerate(tokens):
            if token_id not in special_set and not set(token) <= alphabet:
                # A normal token written in plain text: respell it in the byte alphabet.
                token = "".join(_byte_to_char()[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, token_id)
        merge_pairs: list[tuple[str, str]] = []
        for index, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"merge #{index} must be 'left right', got {merge!r}")
            merge_pairs.append((parts[0], parts[1]))

        backend = _BackendTokenizer(
            models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
        )
        pre = pre_tokenizer or "default"
        if pre in _GPT2_PRE:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        elif pre in _GPT2_DIGITS_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False),
                ]
            )
        elif pre in _LLAMA3_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            supported = _GPT2_PRE + _GPT2_DIGITS_PRE + _LLAMA3_PRE
            raise TokenizerError(
                f"pre_tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                f"expected one of {supported}"
            )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(tokens[i], normalized=False, special=True)
                for i in special_ids
                if int(token_types[i]) == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(tokens[i], normalized=False, special=False)
                for i in special_ids
                if int(token_types[i]) == _USER_DEFINED
            ]
        )
        if backend.get_vocab_size(with_added_tokens=True) != vocab_size:
            raise TokenizerError(
                f"vocabulary has duplicate tokens: {vocab_size} ids map to "
                f"{backend.get_vocab_size(with_added_tokens=True)} distinct entries"
            )

        self._backend = backend
        self._tokens = list(tokens)
        self._special_set = frozenset(special_set)
        self.vocab_size = vocab_size
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.unk_token_id = None if unk_token_id is None else int(unk_token_id)
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self.special_tokens: dict[str, int] = {tokens[i]: i for i in special_ids}
        end_ids = {int(i) for i in extra_eos_token_ids}
        if self.eos_token_id is not None:
            end_ids.add(self.eos_token_id)
        for marker in _END_OF_TURN_MARKERS:
            if marker in self.special_tokens:
                end_ids.add(self.special_tokens[marker])
        bad = sorted(i for i in end_ids if not 0 <= i < vocab_size)
        if bad:
            raise TokenizerError(f"extra_eos_token_ids must be in [0, {vocab_size}), got {bad}")
        self.eos_token_ids: frozenset[int] = frozenset(end_ids)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.missing_bytes: frozenset[int] = frozenset(
            byte for byte, char in _byte_to_char().items() if char not in vocab
        )
        self._token_bytes: list[bytes] | None = None
        self._template: Any = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: GGUFMetadata) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata.

        Raises:
          TokenizerError: the tokenizer model is not ``gpt2`` or keys are missing.
        """
        if not isinstance(meta, GGUFMetadata):
            raise TypeError(f"meta must be a GGUFMetadata, got {type(meta).__name__}")
        fields = meta.fields
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{meta.path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) "
                "is supported"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in fields:
                raise TokenizerError(f"{meta.path}: metadata key {key!r} is missing")

        def optional_id(key: str) -> int | None:
            value = fields.get(key)
            return None if value is None else int(value)

        token_types = fields.get("tokenizer.ggml.token_type")
        extra = [
            int(fields[key])
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if key in fields
        ]
        template = fields.get("tokenizer.chat_template")
        try:
            return cls(
                fields["tokenizer.ggml.tokens"],
                fields["tokenizer.ggml.merges"],
                None if token_types is None else [int(t) for t in token_types],
                bos_token_id=optional_id("tokenizer.ggml.bos_token_id"),
                eos_token_id=optional_id("tokenizer.ggml.eos_token_id"),
                unk_token_id=optional_id("tokenizer.ggml.unknown_token_id"),
                pad_token_id=optional_id("tokenizer.ggml.padding_token_id"),
                extra_eos_token_ids=extra,
                add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                chat_template=template if isinstance(template, str) else None,
                pre_tokenizer=fields.get("tokenizer.ggml.pre"),
            )
        except TokenizerError as err:
            raise TokenizerError(f"{meta.path}: {err}") from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str] | None = None) -> Tokenizer:
        """Read the tokenizer of a GGUF file (None: the default model).

        Raises:
          GGUFError: the file cannot be read.
          TokenizerError: its tokenizer is unsupported.
        """
        return cls.from_metadata(read_gguf_metadata(default_model_path() if path is None else path))

    # -- tokens -----------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        """Text of the BOS token, or None."""
        return None if self.bos_token_id is None else self._tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        """Text of the EOS token, or None."""
        return None if self.eos_token_id is None else self._tokens[self.eos_token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (byte-alphabet spelling for normal tokens)."""
        self._check_id("token_id", token_id)
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-alphabet spelling), or None when absent."""
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        return self._backend.token_to_id(token)

    def _check_id(self, name: str, token_id: Any) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(f"{name} must be an int, got {type(token_id).__name__} {token_id!r}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"{name} must be in [0, {self.vocab_size}), got {token_id}")

    def _check_ids(self, ids: Any) -> list[int]:
        if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
        checked = []
        for position, token_id in enumerate(ids):
            if hasattr(token_id, "item") and not isinstance(token_id, int):
                token_id = token_id.item()  # NumPy / JAX scalars
            self._check_id(f"ids[{position}]", token_id)
            checked.append(token_id)
        return checked

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (UTF-8 text for special tokens)."""
        self._check_id("token_id", token_id)
        return self._all_token_bytes()[token_id]

    def _all_token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:
            char_to_byte = _char_to_byte()
            table = []
            for token_id, token in enumerate(self._tokens):
                if token_id in self._special_set:
                    table.append(token.encode("utf-8"))
                else:
                    table.append(
                        b"".join(
                            bytes([char_to_byte[c]]) if c in char_to_byte else c.encode("utf-8")
                            for c in token
                        )
                    )
            self._token_bytes = table
        return self._token_bytes

    # -- encode / decode -----------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token text (``<|im_start|>``) becomes its id.

        Args:
          text: any string.
          add_bos: prepend BOS; None uses the checkpoint's default (`add_bos`).

        Returns:
          list of ints in ``[0, vocab_size)``. UTF-8 bytes listed in
          `missing_bytes` have no token and are dropped.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TypeError(f"add_bos must be a bool or None, got {add_bos!r}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids; invalid UTF-8 becomes U+FFFD.

        Args:
          ids: token ids in ``[0, vocab_size)`` (ints or NumPy integer scalars).
          skip_special_tokens: drop control tokens (``<|im_end|>`` ...).
        """
        checked = self._check_ids(ids)
        if skip_special_tokens:
            checked = [i for i in checked if i not in self._special_set]
        table = self._all_token_bytes()
        return b"".join(table[i] for i in checked).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh `StreamDecoder` bound to this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's chat template (sandboxed Jinja).

        Args:
          messages: ``[{"role": "user", "content": "..."}, ...]``; ``role`` and
            ``content`` must be strings.
          add_generation_prompt: end with the header of an assistant turn.
          template_kwargs: further variables for the template.

        Returns:
          the prompt text; encode it with ``encode(text, add_bos=False)`` when the
          template writes its own markers.
        """
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat template (tokenizer.chat_template)")
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TypeError(f"messages[{index}] must be a dict, got {type(message).__name__}")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise ValueError(
                        f"messages[{index}][{key!r}] must be a str, got {message.get(key)!r}"
                    )
        if not isinstance(add_generation_prompt, bool):
            raise TypeError(f"add_generation_prompt must be a bool, got {add_generation_prompt!r}")
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **template_kwargs,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        return self._compiled_template().render(**variables)

    def _compiled_template(self) -> Any:
        compiled = self._template
        if compiled is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
            )
            env.filters["tojson"] = _to_json
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = _strftime_now
            compiled = env.from_string(self.chat_template)
            self._template = compiled
        return compiled

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, eos_token_ids={sorted(self.eos_token_ids)})"
        )


class StreamDecoder:
    """Incremental detokenizer for streaming output.

    Feed ids one at a time (or a few); each call returns only the text that is
    complete so far. Bytes of a multi-byte UTF-8 character split across tokens
    are held back until the character is complete, so a returned chunk never
    ends in half a character. Concatenating every chunk and `flush()` gives
    exactly ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._skip_special = bool(skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id (or several) and return the newly completed text ("" if none)."""
        batch = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
        checked = self._tokenizer._check_ids(batch)
        self.ids.extend(checked)
        table = self._tokenizer._all_token_bytes()
        special = self._tokenizer._special_set
        chunk = b"".join(table[i] for i in checked if not (self._skip_special and i in special))
        return self._utf8.decode(chunk, final=False)

    def flush(self) -> str:
        """Return held-back bytes of an unfinished character (as U+FFFD) and reset the state."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    @property
    def pending_bytes(self) -> int:
        """How many bytes are held back waiting for the rest of a character."""
        buffered, _ = self._utf8.getstate()
        return len(buffered)
