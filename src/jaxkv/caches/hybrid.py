"""One cache for a stack whose layers mix attention (full or sliding window), Mamba, Mamba2 and
linear attention, and layers that keep nothing.

``HybridCacheMetadata`` holds the kind of every layer and one metadata per kind in use (its
``num_layers`` is the number of layers of that kind); ``HybridCache.init_cache`` builds the
matching view for each layer, ``None`` for ``"none"`` layers.

Attention views come from a backend named by ``attention_backend``; ``ATTENTION_BACKENDS`` maps
each name to the view class built for ``"attention"`` / ``"sliding_attention"`` layers, and
``ATTENTION_METADATA`` to its metadata class. Every backend's view takes
``concatenate_to_cache(key, value, runtime)`` and returns ``(what attention reads, new view)``.

* ``"contiguous"``: ``TransformerCacheView`` rows ``[batch, max_length, ...]`` (a ring for sliding
  layers). One ``HybridMetadata`` drives a forward pass: its ``attention`` part
  (``TransformerMetadata``) goes to attention views, its ``recurrent`` part
  (``RecurrentMetadata``) to recurrent views; both come from the same per-row token counts.
* ``"paged"``: one page pool per attention layer (``PagedCacheView``; sliding layers use the
  paged cache's ``sliding_window``), all driven by one host ``jaxkv.pages.PageManager``, so
  full and sliding layers share the paging geometry (``num_pages``, ``page_size``,
  ``max_num_seqs``, ``max_pages_per_seq``). Recurrent layers keep their per-row state, with
  ``batch_size == max_num_seqs`` rows. One ``HybridPagedMetadata`` drives a forward pass.

Two token layouts, one step (paged backend). Attention layers read the step's *packed* axis
``[num_tokens]`` (row ``i``'s new tokens at ``query_start_loc[i] .. query_start_loc[i + 1] - 1``,
then padding); recurrent layers and the rest of the model use ``[batch, T]``: batch row ``r`` holds
the new tokens of the sequence in *slot* ``r``, padded on the ``padding_side``.
``HybridPagedMetadata.token_index: [batch, T]`` maps every entry to its packed index (``-1`` for
padding); ``to_packed`` / ``to_batch`` move activations between the two.

Slots. A batch row of the recurrent state belongs to one sequence for that sequence's whole
life, but the step's rows are the *scheduled* sequences in schedule order, which changes as
sequences start, finish or sit a step out. ``HybridPagedMetadata.from_step(step, slots=...)``
therefore takes the slot of each scheduled sequence; by default the ``i``-th scheduled sequence
uses slot ``i``, which is stable only when the host schedules the same sequences in the same
order every step. A host keeps slots stable by giving each sequence a free slot in
``[0, max_num_seqs)`` when it is added (a convenient way: use the slot as the ``seq_id`` and pass
``slots=step.seq_ids``), calling ``HybridCache.reset_rows([slot])`` before a new sequence takes a
slot, and freeing the slot with ``PageManager.free``. Slots not scheduled in a step keep their
state exactly. Recurrent state is not paged: prefix caching and ``fork`` share *pages* only, so a
stack with recurrent layers must run its ``PageManager`` with ``enable_prefix_caching=False`` and
never fork (a stack of attention layers only may use both).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import _validation as v
from jaxkv.abstracts import (
    BaseCache,
    BaseCacheMetadata,
    BaseRunTimeMetadata,
    pytree_dataclass,
    static_field,
)
from jaxkv.caches.paged import PagedCacheMetadata, PagedCacheView, PagedRuntimeMetadata
from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
    RecurrentMetadata,
    init_view,
)
from jaxkv.caches.transformer import (
    TransformerCacheMetadata,
    TransformerCacheView,
    TransformerMetadata,
)
from jaxkv.errors import CacheOverflowError
from jaxkv.pages.step import StepMetadata

LAYER_KINDS = ("attention", "sliding_attention", "mamba", "mamba2", "linear_attention", "none")
ATTENTION_KINDS = ("attention", "sliding_attention")
RECURRENT_KINDS = ("mamba", "mamba2", "linear_attention")

KIND_METADATA: dict[str, type] = {
    "attention": TransformerCacheMetadata,
    "sliding_attention": TransformerCacheMetadata,
    "mamba": MambaCacheMetadata,
    "mamba2": Mamba2CacheMetadata,
    "linear_attention": LinearAttentionCacheMetadata,
}
"""The metadata class of each kind that keeps a state with the ``"contiguous"`` backend
(``"none"`` keeps nothing); attention kinds take ``ATTENTION_METADATA[backend]``."""

ATTENTION_BACKENDS: dict[str, type] = {
    "contiguous": TransformerCacheView,
    "paged": PagedCacheView,
}
"""Attention view class per ``attention_backend`` name."""

ATTENTION_METADATA: dict[str, type] = {
    "contiguous": TransformerCacheMetadata,
    "paged": PagedCacheMetadata,
}
"""Attention metadata class per ``attention_backend`` name."""

PAGED_GEOMETRY = ("num_pages", "page_size", "max_num_seqs", "max_pages_per_seq")
"""Paged fields that full and sliding attention layers must share (one page manager)."""

AttentionMetadata = TransformerCacheMetadata | PagedCacheMetadata


def _kind_metadata_type(kind: str, backend: str) -> type:
    return ATTENTION_METADATA[backend] if kind in ATTENTION_KINDS else KIND_METADATA[kind]


def _rows(metadata: BaseCacheMetadata) -> int:
    """Batch rows of a per-kind metadata: ``batch_size``, or a paged pool's ``max_num_seqs``."""
    if isinstance(metadata, PagedCacheMetadata):
        return metadata.max_num_seqs
    return metadata.batch_size


@pytree_dataclass
class HybridCacheMetadata(BaseCacheMetadata):
    """Static configuration of a hybrid cache.

    Attributes:
        layer_kinds: the kind of every layer, one of ``LAYER_KINDS``.
        attention: metadata of the full-attention layers (``sliding_window`` ``None``), or
            ``None`` when no layer is ``"attention"``: a ``TransformerCacheMetadata`` for the
            ``"contiguous"`` backend, a ``PagedCacheMetadata`` for ``"paged"``.
        sliding_attention: metadata of the sliding-window layers (``sliding_window`` set), same
            class as ``attention``.
        mamba, mamba2, linear_attention: metadata of the recurrent layers of each kind.
        attention_backend: which attention view to build (a key of ``ATTENTION_BACKENDS``).

    Each per-kind metadata has ``num_layers`` equal to the number of layers of its kind and the
    cache's rows (``batch_size``; ``max_num_seqs`` for paged metadata); it is present exactly
    when some layer has that kind. Paged full and sliding metadata share ``PAGED_GEOMETRY``.
    """

    layer_kinds: tuple[str, ...]
    attention: TransformerCacheMetadata | PagedCacheMetadata | None = None
    sliding_attention: TransformerCacheMetadata | PagedCacheMetadata | None = None
    mamba: MambaCacheMetadata | None = None
    mamba2: Mamba2CacheMetadata | None = None
    linear_attention: LinearAttentionCacheMetadata | None = None
    attention_backend: str = "contiguous"

    @classmethod
    def create(
        cls,
        layer_kinds: Sequence[str],
        *,
        batch_size: int,
        attention: Mapping[str, Any] | AttentionMetadata | None = None,
        sliding_attention: Mapping[str, Any] | AttentionMetadata | None = None,
        mamba: Mapping[str, Any] | MambaCacheMetadata | None = None,
        mamba2: Mapping[str, Any] | Mamba2CacheMetadata | None = None,
        linear_attention: Mapping[str, Any] | LinearAttentionCacheMetadata | None = None,
        attention_backend: str = "contiguous",
    ) -> HybridCacheMetadata:
        """Validated metadata from the per-layer kinds and per-kind settings.

        Each per-kind setting is either a mapping of the keyword arguments of that kind's
        ``create`` without the fields filled in here (``num_layers``, and ``batch_size``, or
        ``max_num_seqs`` for paged attention), e.g. ``attention=dict(max_length=4096,
        num_kv_heads=8, head_dim=128)``, ``sliding_attention=dict(..., sliding_window=1024)``,
        ``mamba2=dict(num_heads=24, head_dim=64, state_size=128)``; with
        ``attention_backend="paged"``: ``attention=dict(num_pages=64, page_size=16,
        num_kv_heads=8, head_dim=128, max_pages_per_seq=16)``. Or a ready metadata of the
        backend's class with these rows and ``num_layers`` equal to the layers of that kind.
        Raises ``ValueError``/``TypeError`` naming the field.
        """
        owner = "HybridCacheMetadata.create"
        if isinstance(layer_kinds, str) or not isinstance(layer_kinds, Sequence):
            raise TypeError(
                f"{owner}: layer_kinds must be a sequence of kind names, got {layer_kinds!r}"
            )
        layer_kinds = tuple(layer_kinds)
        v.require_int(owner, "batch_size", batch_size, minimum=1)
        v.require_choice(owner, "attention_backend", attention_backend, tuple(ATTENTION_BACKENDS))
        settings = {
            "attention": attention,
            "sliding_attention": sliding_attention,
            "mamba": mamba,
            "mamba2": mamba2,
            "linear_attention": linear_attention,
        }
        built = {}
        for kind, given in settings.items():
            count = layer_kinds.count(kind)
            metadata_type = _kind_metadata_type(kind, attention_backend)
            rows_field = "max_num_seqs" if metadata_type is PagedCacheMetadata else "batch_size"
            if isinstance(given, Mapping) and count:
                for reserved in ("batch_size", "num_layers", rows_field):
                    if reserved in given:
                        raise ValueError(
                            f"{owner}: {kind} settings must not give {reserved} (it comes from "
                            f"the hybrid cache), got {reserved}={given[reserved]!r}"
                        )
                try:
                    given = metadata_type.create(
                        **{rows_field: batch_size}, num_layers=count, **dict(given)
                    )
                except TypeError as error:
                    raise TypeError(
                        f"{owner}: {kind} settings do not fit {metadata_type.__name__}.create "
                        f"(attention_backend={attention_backend!r}): {error}"
                    ) from error
            built[kind] = given
        for kind, kind_metadata in built.items():
            has_rows = isinstance(kind_metadata, PagedCacheMetadata) or hasattr(
                kind_metadata, "batch_size"
            )
            if isinstance(kind_metadata, BaseCacheMetadata) and has_rows:
                if _rows(kind_metadata) != batch_size:
                    field = (
                        "max_num_seqs"
                        if isinstance(kind_metadata, PagedCacheMetadata)
                        else "batch_size"
                    )
                    raise ValueError(
                        f"{owner}: {kind}.{field}={_rows(kind_metadata)} must equal "
                        f"batch_size={batch_size}"
                    )
        return cls(layer_kinds=layer_kinds, attention_backend=attention_backend, **built)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridCacheMetadata:
        """Metadata from ``to_dict`` output; attention settings decode to the class of the
        dict's ``attention_backend``."""
        if isinstance(data, dict):
            backend = data.get("attention_backend", "contiguous")
            metadata_type = ATTENTION_METADATA.get(backend) if isinstance(backend, str) else None
            if metadata_type is not None:
                data = dict(data)
                for kind in ATTENTION_KINDS:
                    if isinstance(data.get(kind), dict):
                        data[kind] = metadata_type.from_dict(data[kind])
        return super().from_dict(data)

    def validate(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.layer_kinds, tuple) or not self.layer_kinds:
            raise ValueError(
                f"{owner}: layer_kinds must be a non-empty tuple, got {self.layer_kinds!r}"
            )
        for index, kind in enumerate(self.layer_kinds):
            if kind not in LAYER_KINDS:
                raise ValueError(
                    f"{owner}: layer_kinds[{index}] must be one of {LAYER_KINDS}, got {kind!r}"
                )
        v.require_choice(
            owner, "attention_backend", self.attention_backend, tuple(ATTENTION_BACKENDS)
        )
        rows = set()
        for kind in KIND_METADATA:
            metadata_type = _kind_metadata_type(kind, self.attention_backend)
            metadata = getattr(self, kind)
            count = self.layer_kinds.count(kind)
            if metadata is None:
                if count:
                    raise ValueError(
                        f"{owner}: {count} layer(s) have kind {kind!r} but no {kind} settings "
                        f"were given"
                    )
                continue
            if not count:
                raise ValueError(f"{owner}: {kind} settings given but no layer has kind {kind!r}")
            if not isinstance(metadata, metadata_type):
                raise TypeError(
                    f"{owner}: {kind} must be {metadata_type.__name__} (attention_backend="
                    f"{self.attention_backend!r}) or a mapping of its settings, "
                    f"got {type(metadata).__name__}"
                )
            if metadata.num_layers != count:
                raise ValueError(
                    f"{owner}: {kind}.num_layers must equal the {count} layer(s) of kind "
                    f"{kind!r}, got {metadata.num_layers}"
                )
            rows.add(_rows(metadata))
        if len(rows) > 1:
            raise ValueError(
                f"{owner}: every kind must have the same batch_size (max_num_seqs for paged "
                f"attention), got {sorted(rows)}"
            )
        if self.attention is not None and self.attention.sliding_window is not None:
            raise ValueError(
                f"{owner}: attention.sliding_window must be None (use sliding_attention), "
                f"got {self.attention.sliding_window}"
            )
        if self.sliding_attention is not None and self.sliding_attention.sliding_window is None:
            raise ValueError(f"{owner}: sliding_attention.sliding_window must be set, got None")
        if (
            self.attention_backend == "paged"
            and self.attention is not None
            and self.sliding_attention is not None
        ):
            for name in PAGED_GEOMETRY:
                full, sliding = getattr(self.attention, name), getattr(self.sliding_attention, name)
                if full != sliding:
                    raise ValueError(
                        f"{owner}: attention.{name}={full} and sliding_attention.{name}={sliding} "
                        f"must be equal (one page manager drives every paged layer)"
                    )

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def batch_size(self) -> int | None:
        """Rows of the cache (``None`` when every layer is ``"none"``); for the paged backend
        also the ``max_num_seqs`` of every step."""
        for kind in KIND_METADATA:
            metadata = getattr(self, kind)
            if metadata is not None:
                return _rows(metadata)
        return None

    def paged_geometry(self) -> dict[str, int]:
        """``num_pages``, ``page_size``, ``max_num_seqs`` and ``max_pages_per_seq`` of the paged
        attention layers, the arguments of the ``jaxkv.pages.PageManager`` that drives them:
        ``PageManager(**metadata.paged_geometry(), enable_prefix_caching=False)``.

        Raises:
            ValueError: the backend is not ``"paged"`` or no layer is an attention layer.
        """
        owner = "HybridCacheMetadata.paged_geometry"
        paged = self.attention if self.attention is not None else self.sliding_attention
        if self.attention_backend != "paged" or paged is None:
            raise ValueError(
                f"{owner}: needs attention_backend='paged' and at least one attention layer, got "
                f"attention_backend={self.attention_backend!r} and layer kinds {self.layer_kinds}"
            )
        return {name: getattr(paged, name) for name in PAGED_GEOMETRY}

    def layer_metadata(self, layer: int) -> BaseCacheMetadata | None:
        """The metadata of layer ``layer``'s view (``None`` for a ``"none"`` layer)."""
        v.require_int("HybridCacheMetadata.layer_metadata", "layer", layer, minimum=0)
        if layer >= self.num_layers:
            raise ValueError(
                f"HybridCacheMetadata.layer_metadata: layer {layer} out of range for "
                f"{self.num_layers} layers"
            )
        kind = self.layer_kinds[layer]
        return None if kind == "none" else getattr(self, kind)

    def bytes_total(self) -> int:
        """Bytes the whole cache allocates (every kind's ``bytes_total``)."""
        return sum(
            getattr(self, kind).bytes_total()
            for kind in KIND_METADATA
            if getattr(self, kind) is not None
        )


@pytree_dataclass
class HybridMetadata(BaseRunTimeMetadata):
    """Runtime metadata of one forward pass through a hybrid stack with the ``"contiguous"``
    attention backend.

    Attributes:
        attention: what attention views take (``TransformerMetadata``; ``None``: all tokens
            real).
        recurrent: what recurrent views take (``RecurrentMetadata``; ``None``: all real).
    """

    attention: TransformerMetadata | None = None
    recurrent: RecurrentMetadata | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.attention is not None and not isinstance(self.attention, TransformerMetadata):
            raise TypeError(
                f"{owner}: attention must be TransformerMetadata, "
                f"got {type(self.attention).__name__}"
            )
        if self.recurrent is not None and not isinstance(self.recurrent, RecurrentMetadata):
            raise TypeError(
                f"{owner}: recurrent must be RecurrentMetadata, got {type(self.recurrent).__name__}"
            )

    @classmethod
    def create(cls, new_lengths: Any = None, padding_side: str = "right") -> HybridMetadata:
        """Both parts from the same per-row real token counts (``[batch]`` ints, or ``None``:
        every token real) and padding side."""
        if new_lengths is None:
            return cls(
                attention=TransformerMetadata.create(None, padding_side),
                recurrent=RecurrentMetadata.create(None, padding_side),
            )
        recurrent = RecurrentMetadata.create(new_lengths, padding_side)
        attention = TransformerMetadata.create(recurrent.new_lengths, padding_side)
        return cls(attention=attention, recurrent=recurrent)

    def for_kind(self, kind: str) -> TransformerMetadata | RecurrentMetadata | None:
        """The part a layer of ``kind`` takes (``None`` for ``"none"``)."""
        v.require_choice("HybridMetadata.for_kind", "kind", kind, LAYER_KINDS)
        if kind in ATTENTION_KINDS:
            return self.attention
        return None if kind == "none" else self.recurrent


def _check_token_index(
    owner: str, token_index: np.ndarray, new_lengths: np.ndarray, padding_side: str, num_tokens: int
) -> None:
    """Host check that ``token_index`` is a valid ``[batch, T]`` layout (see
    ``HybridPagedMetadata``) agreeing with ``new_lengths``."""
    batch, width = token_index.shape
    counts = np.sum(token_index >= 0, axis=1)
    if not np.array_equal(counts, new_lengths):
        raise ValueError(
            f"{owner}: recurrent.new_lengths {new_lengths.tolist()} must count the real "
            f"(>= 0) entries of token_index per row, got {counts.tolist()}"
        )
    if token_index.size and (token_index.min() < -1 or token_index.max() >= num_tokens):
        raise ValueError(
            f"{owner}: token_index must hold packed indices in [0, {num_tokens}) or -1, got "
            f"values in [{token_index.min()}, {token_index.max()}]"
        )
    slot = np.arange(width)[None, :]
    lead = width - counts[:, None] if padding_side == "left" else np.zeros((batch, 1), np.int64)
    real = (slot >= lead) & (slot < lead + counts[:, None])
    first = np.where(
        counts > 0, token_index[np.arange(batch), np.minimum(lead[:, 0], width - 1)], 0
    )
    expected = np.where(real, first[:, None] + slot - lead, -1)
    if not np.array_equal(token_index, expected):
        raise ValueError(
            f"{owner}: each row of token_index must be one run of consecutive packed indices "
            f"padded on the {padding_side} with -1, got {token_index.tolist()}"
        )
    used = token_index[token_index >= 0]
    if np.unique(used).size != used.size:
        raise ValueError(f"{owner}: token_index names a packed token twice: {token_index.tolist()}")


@pytree_dataclass
class HybridPagedMetadata(BaseRunTimeMetadata):
    """Runtime metadata of one step through a hybrid stack with the ``"paged"`` backend.

    With ``S = max_num_seqs`` (= the cache's ``batch_size``), ``N`` the step's padded packed token
    count and ``T`` the per-row width of the batch layout:

    Attributes:
        attention: the step's ``PagedRuntimeMetadata`` (page tables, slot mapping, packed
            ``[N]`` tokens, copy ops ...), what paged attention views take.
        recurrent: ``RecurrentMetadata`` of the ``[S, T]`` batch layout: ``new_lengths: [S]``
            int32 real tokens per slot (``0`` for a slot not scheduled this step, whose state
            stays exactly as it was) and the ``padding_side``; what recurrent views take.
        token_index: ``[S, T]`` int32; ``token_index[r, t]`` is the packed index (into
            ``attention``'s ``[N]`` axis) of the token at column ``t`` of slot ``r``, ``-1`` for
            padding. Each slot's real tokens form one run of consecutive packed indices -- its
            scheduled sequence's ``query_start_loc[i] .. query_start_loc[i + 1] - 1`` -- at the
            start (``"right"`` padding) or end (``"left"``) of the row.

    Build it with ``from_step``; see the module docstring for how slots stay stable.
    """

    attention: PagedRuntimeMetadata
    recurrent: RecurrentMetadata
    token_index: jax.Array

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.attention, PagedRuntimeMetadata):
            raise TypeError(
                f"{owner}: attention must be PagedRuntimeMetadata, "
                f"got {type(self.attention).__name__}"
            )
        if not isinstance(self.recurrent, RecurrentMetadata):
            raise TypeError(
                f"{owner}: recurrent must be RecurrentMetadata, got {type(self.recurrent).__name__}"
            )
        if self.recurrent.new_lengths is None:
            raise ValueError(f"{owner}: recurrent.new_lengths must be a [batch] array, got None")
        if not hasattr(self.token_index, "dtype") or not jnp.issubdtype(
            self.token_index.dtype, jnp.integer
        ):
            raise TypeError(
                f"{owner}: token_index must be a [batch, T] int array, "
                f"got {getattr(self.token_index, 'dtype', type(self.token_index).__name__)}"
            )
        seqs = self.attention.page_tables.shape[0]
        v.check_array(owner, "token_index", self.token_index, (seqs, None))
        v.check_array(owner, "recurrent.new_lengths", self.recurrent.new_lengths, (seqs,))
        if self.token_index.shape[1] < 1:
            raise ValueError(f"{owner}: token_index must have T >= 1 columns, got 0")
        if not v.is_traced(self.token_index, self.recurrent.new_lengths):
            _check_token_index(
                owner,
                np.asarray(self.token_index),
                np.asarray(self.recurrent.new_lengths),
                self.recurrent.padding_side,
                self.num_tokens,
            )

    @classmethod
    def from_step(
        cls,
        step: StepMetadata,
        *,
        slots: Sequence[int] | Mapping[Hashable, int] | None = None,
        width: int | None = None,
        padding_side: str = "right",
    ) -> HybridPagedMetadata:
        """The runtime of one host step (NumPy work on the host; arrays int32).

        Args:
            step: the ``StepMetadata`` from ``PageManager.schedule``.
            slots: the batch row (slot) of each scheduled sequence: a sequence of ints in
                ``step.seq_ids`` order, or a mapping ``seq_id -> slot`` holding every scheduled
                id. Default: the ``i``-th scheduled sequence takes slot ``i``. Slots are
                distinct, in ``[0, max_num_seqs)``.
            width: ``T``, columns of the batch layout, at least the longest row of new tokens;
                also the ``max_query_len`` of the paged part, so a jitted step compiles once per
                ``(num_tokens, width)``. Default: that longest row rounded up to a power of two
                (at most the padded token count).
            padding_side: where each slot's padding sits, ``"right"`` or ``"left"``.

        Raises:
            TypeError: ``step`` is not a ``StepMetadata``; a slot that is not an int.
            ValueError: slots of the wrong count, repeated or out of range, a missing seq id;
                a ``width`` shorter than a row; a bad ``padding_side``; step arrays that
                disagree (see ``PagedRuntimeMetadata.from_step``).
        """
        owner = "HybridPagedMetadata.from_step"
        if not isinstance(step, StepMetadata):
            raise TypeError(f"{owner}: step must be a StepMetadata, got {type(step).__name__}")
        v.require_choice(owner, "padding_side", padding_side, ("right", "left"))
        attention = PagedRuntimeMetadata.from_step(step)
        seqs = int(step.page_tables.shape[0])
        slot_of_row = _resolve_slots(owner, step, slots, seqs)
        counts = np.asarray(step.num_new_tokens, np.int64)
        longest = int(counts.max(initial=0))
        if width is None:
            width = max(attention.max_query_len, longest, 1)
        v.require_int(owner, "width", width, minimum=1)
        if width < longest:
            raise ValueError(
                f"{owner}: width={width} is shorter than the longest row of new tokens "
                f"({longest}); expected width >= {longest}"
            )
        starts = np.asarray(step.query_start_loc, np.int64)[: step.num_seqs]
        new_lengths = np.zeros((seqs,), np.int32)
        new_lengths[slot_of_row] = counts
        column = np.arange(width)[None, :]
        lead = (width - counts)[:, None] if padding_side == "left" else 0
        rank = column - lead  # [num_seqs, width] rank among the row's new tokens
        token_index = np.full((seqs, width), -1, np.int32)
        token_index[slot_of_row] = np.where(
            (rank >= 0) & (rank < counts[:, None]), starts[:, None] + rank, -1
        )
        return cls(
            # The width bounds every row's new tokens, so it serves as paged attention's query
            # bound too: a jitted step then specialises on (num_tokens, width) only.
            attention=attention.replace(max_query_len=width),
            recurrent=RecurrentMetadata.create(new_lengths, padding_side),
            token_index=jnp.asarray(token_index),
        )

    @property
    def num_tokens(self) -> int:
        """``N``, the padded length of the packed token axis."""
        return int(self.attention.slot_mapping.shape[0])

    @property
    def batch_size(self) -> int:
        """``S``, rows (slots) of the batch layout."""
        return int(self.token_index.shape[0])

    @property
    def width(self) -> int:
        """``T``, columns of the batch layout."""
        return int(self.token_index.shape[1])

    def for_kind(self, kind: str) -> PagedRuntimeMetadata | RecurrentMetadata | None:
        """The part a layer of ``kind`` takes (``None`` for ``"none"``)."""
        v.require_choice("HybridPagedMetadata.for_kind", "kind", kind, LAYER_KINDS)
        if kind in ATTENTION_KINDS:
            return self.attention
        return None if kind == "none" else self.recurrent

    def to_packed(self, batched: jax.Array) -> jax.Array:
        """``[S, T, ...]`` -> ``[N, ...]``: each real entry moves to its packed index; packed
        padding gets zeros. Jittable."""
        owner = "HybridPagedMetadata.to_packed"
        v.check_array(
            owner,
            "batched",
            batched,
            (self.batch_size, self.width) + (None,) * (getattr(batched, "ndim", 2) - 2),
        )
        n = self.num_tokens
        target = jnp.where(self.token_index >= 0, self.token_index, n).reshape(-1)
        flat = batched.reshape(-1, *batched.shape[2:])
        packed = jnp.zeros((n, *batched.shape[2:]), batched.dtype)
        return packed.at[target].set(flat, mode="drop")

    def to_batch(self, packed: jax.Array) -> jax.Array:
        """``[N, ...]`` -> ``[S, T, ...]``: each entry reads its packed token; padding entries
        get zeros. Jittable."""
        owner = "HybridPagedMetadata.to_batch"
        v.check_array(
            owner, "packed", packed, (self.num_tokens,) + (None,) * (getattr(packed, "ndim", 1) - 1)
        )
        real = self.token_index >= 0
        gathered = packed[jnp.maximum(self.token_index, 0)]
        mask = real.reshape(real.shape + (1,) * (packed.ndim - 1))
        return jnp.where(mask, gathered, jnp.zeros((), packed.dtype))

    def batch_token_ids(self) -> jax.Array:
        """``[S, T]`` int32 ids of the new tokens in the batch layout (``0`` at padding)."""
        return self.to_batch(self.attention.token_ids.astype(jnp.int32))


def _resolve_slots(owner: str, step: StepMetadata, slots: Any, seqs: int) -> np.ndarray:
    """``[num_seqs]`` int64 slot of each scheduled row, validated."""
    if slots is None:
        return np.arange(step.num_seqs)
    if isinstance(slots, Mapping):
        missing = [seq_id for seq_id in step.seq_ids if seq_id not in slots]
        if missing:
            raise ValueError(f"{owner}: slots has no entry for scheduled seq id(s) {missing}")
        slots = [slots[seq_id] for seq_id in step.seq_ids]
    elif isinstance(slots, str | bytes) or not isinstance(slots, Sequence):
        raise TypeError(
            f"{owner}: slots must be a sequence of ints or a mapping seq_id -> int, got {slots!r}"
        )
    slots = list(slots)
    if len(slots) != step.num_seqs:
        raise ValueError(
            f"{owner}: slots has {len(slots)} entries; expected one per scheduled sequence "
            f"({step.num_seqs})"
        )
    for index, slot in enumerate(slots):
        v.require_int(owner, f"slots[{index}]", slot)
        if not 0 <= slot < seqs:
            raise ValueError(f"{owner}: slots[{index}]={slot} outside [0, max_num_seqs={seqs})")
    if len(set(slots)) != len(slots):
        raise ValueError(f"{owner}: slots must be distinct, got {slots}")
    return np.asarray(slots, np.int64)


@pytree_dataclass
class HybridCache(BaseCache):
    """One view per layer of a hybrid stack (``None`` for ``"none"`` layers).

    Attributes:
        views: attention views (``ATTENTION_BACKENDS[metadata.attention_backend]``),
            ``MambaCacheView``, ``Mamba2CacheView``, ``LinearAttentionCacheView`` or ``None``.
        metadata: the ``HybridCacheMetadata`` (static).
    """

    views: tuple[Any, ...]
    metadata: HybridCacheMetadata = static_field()

    @classmethod
    def init_cache(cls, metadata: HybridCacheMetadata) -> HybridCache:
        """A cache with an empty view of the right kind for every layer."""
        if not isinstance(metadata, HybridCacheMetadata):
            raise TypeError(
                f"HybridCache.init_cache: metadata must be HybridCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        attention_view = ATTENTION_BACKENDS[metadata.attention_backend]
        views = []
        for layer, kind in enumerate(metadata.layer_kinds):
            kind_metadata = metadata.layer_metadata(layer)
            if kind == "none":
                views.append(None)
            elif kind in ATTENTION_KINDS:
                views.append(attention_view.init(kind_metadata, layer))
            else:
                views.append(init_view(kind_metadata, layer))
        return cls(views=tuple(views), metadata=metadata)

    @classmethod
    def init_empty(cls, metadata: HybridCacheMetadata) -> HybridCache:
        """A cache of ``None`` views, one per layer of ``metadata``."""
        if not isinstance(metadata, HybridCacheMetadata):
            raise TypeError(
                f"HybridCache.init_empty: metadata must be HybridCacheMetadata, "
                f"got {type(metadata).__name__}"
            )
        return cls(views=(None,) * metadata.num_layers, metadata=metadata)

    def layer_kind(self, layer: int) -> str:
        """The kind of layer ``layer``."""
        return self.metadata.layer_kinds[layer]

    def reset_rows(self, rows: Any) -> HybridCache:
        """Empty the selected rows in every layer, so a batch slot can take a new sequence.
        ``rows``: ``[batch]`` bool mask or a sequence of row ids. Paged attention layers are
        left as they are: their pages belong to the page manager (``PageManager.free``)."""
        return self.with_views(
            view if view is None or isinstance(view, PagedCacheView) else view.reset_rows(rows)
            for view in self.views
        )

    def copy_pages(self, copy_ops: jax.Array) -> HybridCache:
        """Apply a step's ``(src, dst)`` page copies (``copy_ops: [C, 2]`` int, ``-1`` rows are
        no-ops) in every paged attention layer; jittable. ``hybrid_forward_cached`` does this
        itself with ``runtime.attention.copy_ops``.

        Raises:
            ValueError: the cache's backend is not ``"paged"``.
        """
        if self.metadata.attention_backend != "paged":
            raise ValueError(
                f"HybridCache.copy_pages: needs attention_backend='paged', got "
                f"{self.metadata.attention_backend!r}"
            )
        return self.with_views(
            view.copy_pages(copy_ops) if isinstance(view, PagedCacheView) else view
            for view in self.views
        )

    def lengths(self) -> jax.Array:
        """``[batch]`` int32 tokens seen per row, from the first layer that keeps per-row
        lengths (paged attention layers do not: the page manager knows each sequence's)."""
        for view in self.views:
            if view is not None and not isinstance(view, PagedCacheView):
                return view.lengths
        raise ValueError(
            "HybridCache.lengths: the cache has no view with per-row lengths (paged attention "
            "layers keep them on the host, in the PageManager)"
        )

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where a contiguous attention write did not fit (recurrent
        layers never overflow; paged capacity is checked on the host by the page manager)."""
        batch = self.metadata.batch_size or 0
        flags = [
            view.overflow
            for view, kind in zip(self.views, self.metadata.layer_kinds, strict=True)
            if isinstance(view, TransformerCacheView) and kind in ATTENTION_KINDS
        ]
        return jnp.any(jnp.stack(flags), axis=0) if flags else jnp.zeros((batch,), jnp.bool_)

    def check_overflow(self) -> None:
        """Raise ``CacheOverflowError`` if any row overflowed (call after a jitted step)."""
        rows = np.flatnonzero(np.asarray(self.overflow_rows())).tolist()
        if rows:
            raise CacheOverflowError(
                f"rows {rows} overflowed an attention layer's max_length: their last write was "
                f"dropped (cached tokens are intact)"
            )
