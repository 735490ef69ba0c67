"""Tokenizers, chat template and streaming detokenizer read from a GGUF file.

The vocabulary, merges, special-token ids and chat template all come from the
GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``); the BPE
itself runs in the `tokenizers` package. Nothing is downloaded. Two tokenizer
models (``tokenizer.ggml.model``) are supported:

* ``gpt2``: byte-level BPE (SmolLM2, Llama-3 and most BPE Llama-family checkpoints);
  tokens are spelled in GPT-2's byte alphabet.
* ``llama``: SentencePiece-style BPE (Gemma 3): tokens spelled with ``▁`` for a space,
  ``<0xNN>`` byte tokens for bytes no piece covers (byte fallback), BOS prepended by
  default. A file without ``tokenizer.ggml.merges`` gets them rebuilt from the
  vocabulary: every split of a piece into two pieces is a merge, ranked by the piece's
  priority -- its position in the file for Gemma (whose scores do not follow its merge
  order), its score otherwise -- and, within one piece, longer left parts first. This is
  the rule HF transformers' GGUF loader applies, so ids match HF's tokenizer for the same
  file.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import json
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxkv.io.gguf import GGUFMetadata, default_model_path, read_gguf_metadata

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerError"]

# GGUF token types (llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4
_BYTE = 6

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
    """The GGUF tokenizer metadata is missing, malformed or describes an unsupported tokenizer,
    or its chat template fails to render."""


def _check_text(name: str, text: Any) -> str:
    """``text`` if it is a str that UTF-8 can encode, else TypeError/ValueError naming ``name``.

    A str holding lone surrogates (what ``errors="surrogateescape"`` makes of bytes that are not
    UTF-8, e.g. ``sys.stdin`` or ``sys.argv`` given Latin-1 bytes) cannot be tokenized.
    """
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__} {text!r:.80}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            code = ord(text[err.start])
            origin = (
                f" (the undecodable input byte 0x{code - 0xDC00:02X})"
                if 0xDC80 <= code <= 0xDCFF
                else ""
            )
            raise ValueError(
                f"{name} must be valid UTF-8 text, but position {err.start} holds the lone "
                f"surrogate U+{code:04X}{origin}"
            ) from None
    return text


def _as_index(value: Any) -> int | None:
    """``value`` as an int when it is an integer (Python, NumPy or JAX scalar), not a bool."""
    if isinstance(value, bool):
        return None
    try:  # numpy.bool has no __index__
        return operator.index(value)
    except TypeError:
        return None


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


_MODELS = ("gpt2", "llama")
_MERGE_PRIORITIES = ("score", "position")
_SPACE = "\u2581"  # SentencePiece's visible space
# Architectures whose SentencePiece merges follow the file's order, not the scores.
_POSITION_RANKED = ("gemma", "gemma2", "gemma3")


def _byte_piece(byte: int) -> str:
    """The SentencePiece byte-fallback token of one byte, e.g. ``<0x0A>``."""
    return f"<0x{byte:02X}>"


def _byte_level_backend(
    tokens: Sequence[str],
    special_set: set[int],
    merge_pairs: list[tuple[str, str]],
    pre_tokenizer: str | None,
) -> tuple[Any, dict[str, int]]:
    """(backend, model vocabulary) of a GPT-2 byte-level BPE vocabulary."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _BackendTokenizer

    alphabet = set(_char_to_byte())
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token_id not in special_set and not set(token) <= alphabet:
            # A normal token written in plain text: respell it in the byte alphabet.
            token = "".join(_byte_to_char()[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    try:
        backend = _BackendTokenizer(
            models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
        )
    except Exception as err:  # `tokenizers` raises a bare Exception, e.g. for a merge
        # whose parts or result are not in the vocabulary
        raise TokenizerError(f"tokens and merges do not form a BPE vocabulary: {err}") from err
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
    return backend, vocab


def _model_piece(token: str) -> str:
    """A SentencePiece token as the BPE model sees it: a piece of plain spaces (stored as
    spaces by llama.cpp's converter) spelled with ``▁``, since text reaches the model with its
    spaces replaced by ``▁``."""
    if " " in token and not token.strip():
        return _SPACE * len(token)
    return token


def _rebuild_merges(vocab: dict[str, int], ranks: Sequence[float] | None) -> list[tuple[str, str]]:
    """The BPE merges a vocabulary implies: every split of a piece into two pieces.

    Pieces with a higher rank merge first (ties: earlier in ``vocab`` first); the splits of one
    piece are ordered by longer left part first.

    Args:
      vocab: piece -> id, in id order.
      ranks: ``[len(vocab)]`` priority of each id (higher merges first); ``None``: by id
        (earlier pieces first), the order the loop below finds them in, so nothing is sorted.
    """
    found: list[tuple[float, int, int, int, str, str]] = []
    merges: list[tuple[str, str]] = []
    for order, (piece, token_id) in enumerate(vocab.items()):
        rank = 0.0 if ranks is None else float(ranks[token_id])
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                if ranks is None:
                    merges.append((left, right))
                else:
                    found.append((-rank, -len(left), -len(right), order, left, right))
    if ranks is None:
        return merges
    found.sort(key=lambda entry: entry[:4])
    return [(left, right) for *_, left, right in found]


def _sentencepiece_backend(
    tokens: Sequence[str],
    merge_pairs: list[tuple[str, str]],
    scores: Sequence[float] | None,
    merge_priority: str,
    *,
    unk_token: str | None,
    add_space_prefix: bool,
) -> tuple[Any, dict[str, int]]:
    """(backend, model vocabulary) of a SentencePiece-style BPE vocabulary with byte fallback."""
    from tokenizers import Tokenizer as _BackendTokenizer
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if merge_priority not in _MERGE_PRIORITIES:
        raise TokenizerError(
            f"merge_priority must be one of {_MERGE_PRIORITIES}, got {merge_priority!r:.80}"
        )
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab[_model_piece(token)] = token_id
    if not merge_pairs:
        if merge_priority == "position":
            ranks: Any = None
        else:
            if scores is None or isinstance(scores, str) or len(scores) != len(tokens):
                raise TokenizerError(
                    "scores (tokenizer.ggml.scores) must give one number per token "
                    f"({len(tokens)}) to rebuild the merges, got "
                    f"{None if scores is None else len(scores)}"
                )
            ranks = scores
        merge_pairs = _rebuild_merges(vocab, ranks)
    try:
        backend = _BackendTokenizer(
            BPE(
                vocab=vocab,
                merges=merge_pairs,
                unk_token=unk_token,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
    except Exception as err:  # `tokenizers` raises a bare Exception
        raise TokenizerError(f"tokens and merges do not form a BPE vocabulary: {err}") from err
    steps = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    return backend, vocab


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


def _to_json(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class Tokenizer:
    """Byte-level BPE or SentencePiece-style BPE tokenizer of a GGUF checkpoint.

    Build it with `Tokenizer.from_gguf(path)` or `Tokenizer.from_metadata(meta)`.

    Attributes:
      model: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style BPE with byte
        fallback), the GGUF ``tokenizer.ggml.model``.
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
        model: str = "gpt2",
        scores: Sequence[float] | None = None,
        merge_priority: str = "score",
        add_space_prefix: bool = False,
    ) -> None:
        """Build from raw vocabulary data.

        Args:
          tokens: token strings; index = id. ``gpt2``: spelled in GPT-2's byte
            alphabet; ``llama``: SentencePiece pieces (``▁`` for a space, ``<0xNN>``
            byte tokens).
          merges: BPE merges, each ``"left right"``, highest priority first. May be
            empty for ``llama``: they are then rebuilt from the vocabulary (see the
            module docstring).
          token_types: GGUF token type per id (3 control, 4 user-defined, 6 byte, ...);
            None treats every token as normal.
          bos_token_id, eos_token_id, unk_token_id, pad_token_id: special ids or None.
          extra_eos_token_ids: further ids that end generation.
          add_bos: default of `encode`'s ``add_bos``.
          chat_template: Jinja template for `apply_chat_template`, or None.
          pre_tokenizer: GGUF ``tokenizer.ggml.pre`` name selecting how text is
            split before BPE (None means GPT-2's split); ``gpt2`` only.
          model: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style BPE).
          scores: ``llama`` only: one score per token (``tokenizer.ggml.scores``),
            the merge priority when ``merge_priority="score"`` and merges are rebuilt.
          merge_priority: ``llama`` only: ``"score"`` or ``"position"`` (earlier
            pieces merge first), how rebuilt merges are ranked.
          add_space_prefix: ``llama`` only: prepend ``▁`` to the text
            (``tokenizer.ggml.add_space_prefix``).

        Raises:
          TokenizerError: inconsistent inputs, an unsupported model or pre-tokenizer.
        """
        from tokenizers import AddedToken

        if not isinstance(model, str) or model not in _MODELS:
            raise TokenizerError(
                f"model (tokenizer.ggml.model) must be one of {_MODELS}, got {model!r:.80}"
            )
        if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
            raise TokenizerError(f"tokens must be a non-empty sequence of str, got {tokens!r:.80}")
        for token_id, token in enumerate(tokens):
            if not isinstance(token, str):
                raise TokenizerError(
                    f"tokens[{token_id}] must be a str, got {type(token).__name__} {token!r:.80}"
                )
        if isinstance(merges, str) or not isinstance(merges, Sequence):
            raise TokenizerError(f"merges must be a sequence of str, got {type(merges).__name__}")
        vocab_size = len(tokens)
        if token_types is None:
            token_types = [1] * vocab_size
        if (
            isinstance(token_types, str | bytes)
            or not isinstance(token_types, Iterable)
            or not hasattr(token_types, "__len__")
        ):
            raise TokenizerError(
                f"token_types must be a sequence of ints, got {type(token_types).__name__}"
            )
        if len(token_types) != vocab_size:
            raise TokenizerError(
                f"token_types must have one entry per token ({vocab_size}), got {len(token_types)}"
            )
        checked_types = []
        for token_id, kind in enumerate(token_types):
            index = _as_index(kind)
            if index is None:
                raise TokenizerError(
                    f"token_types[{token_id}] must be an int, got {type(kind).__name__} "
                    f"{kind!r:.80}"
                )
            checked_types.append(index)
        token_types = checked_types
        ids: dict[str, int | None] = {}
        for name, value in (
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
            ("unk_token_id", unk_token_id),
            ("pad_token_id", pad_token_id),
        ):
            index = None if value is None else _as_index(value)
            if value is not None and index is None:
                raise TokenizerError(
                    f"{name} must be an int or None, got {type(value).__name__} {value!r:.80}"
                )
            if index is not None and not 0 <= index < vocab_size:
                raise TokenizerError(f"{name} must be in [0, {vocab_size}), got {value}")
            ids[name] = index

        special_ids = [
            i for i, kind in enumerate(token_types) if int(kind) in (_CONTROL, _USER_DEFINED)
        ]
        special_set = set(special_ids)
        merge_pairs: list[tuple[str, str]] = []
        for index, merge in enumerate(merges):
            if not isinstance(merge, str):
                raise TokenizerError(
                    f"merge #{index} must be a str 'left right', got {type(merge).__name__} "
                    f"{merge!r:.80}"
                )
            parts = merge.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"merge #{index} must be 'left right', got {merge!r}")
            merge_pairs.append((parts[0], parts[1]))
        if pre_tokenizer is not None and not isinstance(pre_tokenizer, str):
            raise TokenizerError(
                f"pre_tokenizer (tokenizer.ggml.pre) must be a str or None, got "
                f"{type(pre_tokenizer).__name__} {pre_tokenizer!r:.80}"
            )
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(
                "chat_template (tokenizer.chat_template) must be a str or None, got "
                f"{type(chat_template).__name__} {chat_template!r:.80}"
            )
        if model == "gpt2":
            backend, vocab = _byte_level_backend(tokens, special_set, merge_pairs, pre_tokenizer)
            missing_bytes = frozenset(
                byte for byte, char in _byte_to_char().items() if char not in vocab
            )
        else:
            if not isinstance(add_space_prefix, bool):
                raise TokenizerError(
                    "add_space_prefix (tokenizer.ggml.add_space_prefix) must be a bool, got "
                    f"{type(add_space_prefix).__name__} {add_space_prefix!r:.80}"
                )
            backend, vocab = _sentencepiece_backend(
                tokens,
                merge_pairs,
                scores,
                merge_priority,
                unk_token=None if ids["unk_token_id"] is None else tokens[ids["unk_token_id"]],
                add_space_prefix=add_space_prefix,
            )
            missing_bytes = frozenset(byte for byte in range(256) if _byte_piece(byte) not in vocab)
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
                # A SentencePiece piece respelled for the model (spaces as "▁") stays a piece.
                if int(token_types[i]) == _USER_DEFINED and tokens[i] in vocab
            ]
        )
        if backend.get_vocab_size(with_added_tokens=True) != vocab_size:
            raise TokenizerError(
                f"vocabulary has duplicate tokens: {vocab_size} ids map to "
                f"{backend.get_vocab_size(with_added_tokens=True)} distinct entries"
            )

        self._backend = backend
        self.model = model
        self._tokens = list(tokens)
        self._token_types = token_types
        self._special_set = frozenset(special_set)
        self.vocab_size = vocab_size
        self.bos_token_id = ids["bos_token_id"]
        self.eos_token_id = ids["eos_token_id"]
        self.unk_token_id = ids["unk_token_id"]
        self.pad_token_id = ids["pad_token_id"]
        self.special_tokens: dict[str, int] = {tokens[i]: i for i in special_ids}
        end_ids = set()
        for extra in extra_eos_token_ids:
            index = _as_index(extra)
            if index is None:
                raise TokenizerError(
                    f"extra_eos_token_ids must hold ints, got {type(extra).__name__} {extra!r:.80}"
                )
            end_ids.add(index)
        if self.eos_token_id is not None:
            end_ids.add(self.eos_token_id)
        for marker in _END_OF_TURN_MARKERS:
            if marker in self.special_tokens:
                end_ids.add(self.special_tokens[marker])
        bad = sorted(i for i in end_ids if not 0 <= i < vocab_size)
        if bad:
            raise TokenizerError(f"extra_eos_token_ids must be in [0, {vocab_size}), got {bad}")
        self.eos_token_ids: frozenset[int] = frozenset(end_ids)
        if not isinstance(add_bos, bool):
            raise TokenizerError(
                f"add_bos (tokenizer.ggml.add_bos_token) must be a bool, got "
                f"{type(add_bos).__name__} {add_bos!r:.80}"
            )
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.missing_bytes: frozenset[int] = missing_bytes
        self._token_bytes: list[bytes] | None = None
        self._template: Any = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: GGUFMetadata) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata.

        Args:
          meta: from `read_gguf_metadata`.

        Returns:
          the tokenizer.

        Raises:
          TypeError: ``meta`` is not a `GGUFMetadata`.
          TokenizerError: the tokenizer model is neither ``gpt2`` nor ``llama``, keys
            are missing, or a value has the wrong type (e.g. a bool or string where an id
            belongs).
        """
        if not isinstance(meta, GGUFMetadata):
            raise TypeError(f"meta must be a GGUFMetadata, got {type(meta).__name__} {meta!r:.80}")
        fields = meta.fields
        model = fields.get("tokenizer.ggml.model")
        if not isinstance(model, str) or model not in _MODELS:
            raise TokenizerError(
                f"{meta.path}: tokenizer.ggml.model is {model!r:.80}; supported: 'gpt2' "
                "(byte-level BPE) and 'llama' (SentencePiece-style BPE)"
            )
        required = ["tokenizer.ggml.tokens"]
        required.append("tokenizer.ggml.merges" if model == "gpt2" else "tokenizer.ggml.scores")
        for key in required:
            if key not in fields:
                raise TokenizerError(
                    f"{meta.path}: tokenizer.ggml.model is {model!r} but metadata key {key!r} "
                    "is missing"
                )
        options: dict[str, Any] = {}
        if model == "llama":
            options = dict(
                model="llama",
                scores=fields.get("tokenizer.ggml.scores"),
                merge_priority=("position" if meta.architecture in _POSITION_RANKED else "score"),
                add_space_prefix=fields.get("tokenizer.ggml.add_space_prefix", True),
            )

        def optional_id(key: str) -> int | None:
            value = fields.get(key)
            if value is None:
                return None
            index = _as_index(value)
            if index is None:
                raise TokenizerError(
                    f"{meta.path}: metadata key {key!r} must be an integer token id, got "
                    f"{type(value).__name__} {value!r:.80}"
                )
            return index

        extra = [
            index
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if (index := optional_id(key)) is not None
        ]
        try:
            return cls(
                fields["tokenizer.ggml.tokens"],
                fields.get("tokenizer.ggml.merges", []),
                fields.get("tokenizer.ggml.token_type"),
                bos_token_id=optional_id("tokenizer.ggml.bos_token_id"),
                eos_token_id=optional_id("tokenizer.ggml.eos_token_id"),
                unk_token_id=optional_id("tokenizer.ggml.unknown_token_id"),
                pad_token_id=optional_id("tokenizer.ggml.padding_token_id"),
                extra_eos_token_ids=extra,
                add_bos=fields.get("tokenizer.ggml.add_bos_token", False),
                chat_template=fields.get("tokenizer.chat_template"),
                pre_tokenizer=fields.get("tokenizer.ggml.pre") if model == "gpt2" else None,
                **options,
            )
        except TokenizerError as err:
            raise TokenizerError(f"{meta.path}: {err}") from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str] | None = None) -> Tokenizer:
        """Read the tokenizer of a GGUF file (None: the default model).

        Args:
          path: a GGUF file, or None for `default_model_path()`.

        Returns:
          the tokenizer its metadata describes.

        Raises:
          TypeError: ``path`` is not a str, os.PathLike or None.
          GGUFError: the file cannot be read.
          TokenizerError: its tokenizer is unsupported or its metadata malformed.
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
        """The vocabulary entry of ``token_id`` as the file spells it (GPT-2's byte alphabet for
        normal ``gpt2`` tokens, ``▁`` for spaces in ``llama`` pieces).

        Raises:
          TypeError: ``token_id`` is not an int (NumPy/JAX integer scalars count; bools do not).
          ValueError: ``token_id`` is outside ``[0, vocab_size)``.
        """
        return self._tokens[self._check_id("token_id", token_id)]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (spelled as `id_to_token` gives it), or None when absent."""
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__} {token!r:.80}")
        if self.model == "llama":
            token = _model_piece(token)  # the BPE model spells pieces of spaces with "▁"
        return self._backend.token_to_id(token)

    def _check_id(self, name: str, token_id: Any) -> int:
        index = token_id if type(token_id) is int else _as_index(token_id)
        if index is None:
            raise TypeError(
                f"{name} must be an int, got {type(token_id).__name__} {token_id!r:.80}"
            )
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"{name} must be in [0, {self.vocab_size}), got {index}")
        return index

    def _check_ids(self, ids: Any, expected: str = "a sequence of ints") -> list[int]:
        """``ids`` as a list of in-range ints; nothing is kept when any one is bad."""
        if isinstance(ids, str | bytes | bytearray | memoryview) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be {expected}, got {type(ids).__name__} {ids!r:.80}")
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) != 1:
            raise ValueError(f"ids must be {expected} (one dimension), got shape {tuple(shape)}")
        return [self._check_id(f"ids[{i}]", token_id) for i, token_id in enumerate(ids)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (UTF-8 text for special tokens)."""
        return self._all_token_bytes()[self._check_id("token_id", token_id)]

    def _all_token_bytes(self) -> list[bytes]:
        if self._token_bytes is None and self.model == "llama":
            table = []
            for token_id, token in enumerate(self._tokens):
                kind = self._token_types[token_id]
                if kind == _BYTE and len(token) == 6 and token.startswith("<0x"):
                    table.append(bytes([int(token[3:5], 16)]))
                elif token_id in self._special_set:
                    table.append(token.encode("utf-8"))
                else:
                    table.append(token.replace(_SPACE, " ").encode("utf-8"))
            self._token_bytes = table
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
          text: any string UTF-8 can encode (NUL characters are text like any other).
          add_bos: prepend BOS; None uses the checkpoint's default (`add_bos`).

        Returns:
          list of ints in ``[0, vocab_size)``. UTF-8 bytes listed in
          `missing_bytes` have no token and are dropped.

        Raises:
          TypeError: ``text`` is not a str (e.g. bytes: decode them first), or
            ``add_bos`` is not a bool or None.
          ValueError: ``text`` holds a lone surrogate, so it is not valid UTF-8
            (what ``errors="surrogateescape"`` makes of undecodable bytes), or
            ``add_bos=True`` and the tokenizer has no BOS token.
        """
        _check_text("text", text)
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TypeError(
                f"add_bos must be a bool or None, got {type(add_bos).__name__} {add_bos!r:.80}"
            )
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids; invalid UTF-8 becomes U+FFFD.

        Args:
          ids: token ids in ``[0, vocab_size)``: a list, tuple, 1-D array or any
            iterable (a generator is consumed) of ints or NumPy/JAX integer scalars.
          skip_special_tokens: drop control tokens (``<|im_end|>`` ...).

        Returns:
          the text.

        Raises:
          TypeError: ``ids`` is not an iterable of ints (str, bytes, bytearray, a
            float or bool id), or ``skip_special_tokens`` is not a bool.
          ValueError: an id is outside ``[0, vocab_size)``, or ``ids`` is an
            array of more than one dimension.
        """
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(
                f"skip_special_tokens must be a bool, got {type(skip_special_tokens).__name__} "
                f"{skip_special_tokens!r:.80}"
            )
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
          messages: ``[{"role": "user", "content": "..."}, ...]`` (a list or tuple;
            not a generator); ``role`` and ``content`` must be strings of valid UTF-8.
          add_generation_prompt: end with the header of an assistant turn.
          template_kwargs: further variables for the template.

        Returns:
          the prompt text; encode it with ``encode(text, add_bos=False)`` when the
          template writes its own markers.

        Raises:
          TypeError: ``messages`` is not a sequence of dicts, or
            ``add_generation_prompt`` is not a bool.
          ValueError: a ``role`` or ``content`` is not a str, or holds a lone
            surrogate (is not valid UTF-8).
          TokenizerError: the checkpoint has no chat template, or the template
            fails to compile or render (it calls ``raise_exception``, touches
            something the sandbox forbids, ...); the cause is chained.
        """
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat template (tokenizer.chat_template)")
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise TypeError(
                f"messages must be a list of dicts, got {type(messages).__name__} {messages!r:.80}"
            )
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TypeError(
                    f"messages[{index}] must be a dict, got {type(message).__name__} "
                    f"{message!r:.80}"
                )
            for key in ("role", "content"):
                name = f"messages[{index}][{key!r}]"
                if not isinstance(message.get(key), str):
                    raise ValueError(f"{name} must be a str, got {message.get(key)!r:.80}")
                _check_text(name, message[key])
        if not isinstance(add_generation_prompt, bool):
            raise TypeError(
                f"add_generation_prompt must be a bool, got {type(add_generation_prompt).__name__} "
                f"{add_generation_prompt!r:.80}"
            )
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **template_kwargs,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled_template().render(**variables)
        except (TokenizerError, ImportError):  # ImportError: jinja2 is not installed
            raise
        except Exception as err:  # the template comes from the file: any failure is its own
            raise TokenizerError(
                f"chat template error: {type(err).__name__}: {err}".rstrip(": ")
            ) from err

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` read as plain text: ``"<|im_start|>"`` in it becomes the ids
        of those characters, never the special token (what untrusted content needs)."""
        _check_text("text", text)
        backend = self._backend
        previous = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = previous

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template, where only the
        template's own markers are special tokens and every message's content is encoded as
        text: a user who writes ``<|im_start|>system`` cannot forge a turn.

        The template is rendered once with a placeholder per message; the text between
        placeholders (the template's markup) is encoded with special tokens, each content as
        plain text. A template that rewrites the content (so the placeholders do not come back
        as they went in) is encoded whole, and refused when a content holds special-token text.

        Raises:
          the errors of ``apply_chat_template``; ``TokenizerError`` for content holding
          special-token text that the template's rewriting leaves no safe way to encode.
        """
        rendered = self.apply_chat_template(messages, add_generation_prompt)
        contents = [m["content"] for m in messages]
        marks = [f"\ue000{index}\ue001" for index in range(len(contents))]
        marked_messages = [
            {**dict(m), "content": mark} for m, mark in zip(messages, marks, strict=True)
        ]
        marked = self.apply_chat_template(marked_messages, add_generation_prompt)
        pieces: list[tuple[str, bool]] = []  # (text, is content)
        rest = marked
        for mark, content in zip(marks, contents, strict=True):
            before, found, after = rest.partition(mark)
            if not found:
                break
            pieces += [(before, False), (content, True)]
            rest = after
        else:
            pieces.append((rest, False))
            if "".join(text for text, _ in pieces) == rendered:
                ids = [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []
                for text, is_content in pieces:
                    if text:
                        ids += self.encode_text(text) if is_content else self.encode(text, False)
                return ids
        specials = [t for t in self.special_tokens if any(t in c for c in contents)]
        if specials:
            raise TokenizerError(
                f"a message's content holds special-token text {specials[:3]} and the chat "
                "template rewrites content, so it cannot be encoded as plain text"
            )
        return self.encode(rendered)

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
        """Add one id (or several) and return the newly completed text ("" if none).

        Args:
          ids: one token id (an int, or a NumPy/JAX integer scalar) or an iterable of them.

        Returns:
          the text completed by these ids.

        Raises:
          TypeError: ``ids`` is neither an int nor an iterable of ints.
          ValueError: an id is outside ``[0, vocab_size)``. Nothing of a rejected
            batch is kept: the decoder is as it was before the call.
        """
        single = _as_index(ids) is not None  # an int, or a 0-d NumPy/JAX integer
        checked = self._tokenizer._check_ids(
            [ids] if single else ids, "an int or a sequence of ints"
        )
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
