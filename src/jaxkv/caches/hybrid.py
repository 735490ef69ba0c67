"""One cache for a stack whose layers mix attention (full or sliding window), Mamba, Mamba2 and
linear attention, and layers that keep nothing.

``HybridCacheMetadata`` holds the kind of every layer and one metadata per kind in use (its
``num_layers`` is the number of layers of that kind); ``HybridCache.init_cache`` builds the
matching view for each layer, ``None`` for ``"none"`` layers. One ``HybridMetadata`` drives a
whole forward pass: its ``attention`` part (a ``TransformerMetadata``) goes to attention views,
its ``recurrent`` part (a ``RecurrentMetadata``) to recurrent views; ``HybridMetadata.create``
builds both from the same per-row token counts so they cannot disagree.

Attention views come from a backend named by ``attention_backend``; ``ATTENTION_BACKENDS`` maps
each name to the view class built for ``"attention"`` / ``"sliding_attention"`` layers. Every
backend's view takes ``concatenate_to_cache(key, value, runtime)`` and returns
``(what attention reads, new view)``, so a model calls them alike. Today only ``"contiguous"``
(``TransformerCacheView``) exists; a paged backend plugs in by registering its view class and
adding a field for its metadata next to ``attention`` / ``sliding_attention`` (and its runtime
type next to ``HybridMetadata.attention``), without changing the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
"""The metadata class of each kind that keeps a state (``"none"`` keeps nothing)."""

ATTENTION_BACKENDS: dict[str, type] = {"contiguous": TransformerCacheView}
"""Attention view class per ``attention_backend`` name."""


@pytree_dataclass
class HybridCacheMetadata(BaseCacheMetadata):
    """Static configuration of a hybrid cache.

    Attributes:
        layer_kinds: the kind of every layer, one of ``LAYER_KINDS``.
        attention: metadata of the full-attention layers (``sliding_window`` ``None``), or
            ``None`` when no layer is ``"attention"``.
        sliding_attention: metadata of the sliding-window layers (``sliding_window`` set).
        mamba, mamba2, linear_attention: metadata of the recurrent layers of each kind.
        attention_backend: which attention view to build (a key of ``ATTENTION_BACKENDS``).

    Each per-kind metadata has the cache's ``batch_size`` and ``num_layers`` equal to the number
    of layers of its kind; it is present exactly when some layer has that kind.
    """

    layer_kinds: tuple[str, ...]
    attention: TransformerCacheMetadata | None = None
    sliding_attention: TransformerCacheMetadata | None = None
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
        attention: Mapping[str, Any] | TransformerCacheMetadata | None = None,
        sliding_attention: Mapping[str, Any] | TransformerCacheMetadata | None = None,
        mamba: Mapping[str, Any] | MambaCacheMetadata | None = None,
        mamba2: Mapping[str, Any] | Mamba2CacheMetadata | None = None,
        linear_attention: Mapping[str, Any] | LinearAttentionCacheMetadata | None = None,
        attention_backend: str = "contiguous",
    ) -> HybridCacheMetadata:
        """Validated metadata from the per-layer kinds and per-kind settings.

        Each per-kind setting is either a mapping of the keyword arguments of that kind's
        ``create`` without ``batch_size`` and ``num_layers`` (filled in here), e.g.
        ``attention=dict(max_length=4096, num_kv_heads=8, head_dim=128)``,
        ``sliding_attention=dict(..., sliding_window=1024)``, ``mamba2=dict(num_heads=24,
        head_dim=64, state_size=128)``; or a ready metadata with this ``batch_size`` and
        ``num_layers`` equal to the layers of that kind. Raises ``ValueError``/``TypeError``
        naming the field.
        """
        owner = "HybridCacheMetadata.create"
        if isinstance(layer_kinds, str) or not isinstance(layer_kinds, Sequence):
            raise TypeError(
                f"{owner}: layer_kinds must be a sequence of kind names, got {layer_kinds!r}"
            )
        layer_kinds = tuple(layer_kinds)
        v.require_int(owner, "batch_size", batch_size, minimum=1)
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
            if isinstance(given, Mapping) and count:
                for reserved in ("batch_size", "num_layers"):
                    if reserved in given:
                        raise ValueError(
                            f"{owner}: {kind} settings must not give {reserved} (it comes from "
                            f"the hybrid cache), got {reserved}={given[reserved]!r}"
                        )
                given = KIND_METADATA[kind].create(
                    batch_size=batch_size, num_layers=count, **dict(given)
                )
            built[kind] = given
        for kind, kind_metadata in built.items():
            if isinstance(kind_metadata, BaseCacheMetadata) and hasattr(
                kind_metadata, "batch_size"
            ):
                if kind_metadata.batch_size != batch_size:
                    raise ValueError(
                        f"{owner}: {kind}.batch_size={kind_metadata.batch_size} must equal "
                        f"batch_size={batch_size}"
                    )
        return cls(layer_kinds=layer_kinds, attention_backend=attention_backend, **built)

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
        batch_sizes = set()
        for kind, metadata_type in KIND_METADATA.items():
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
                    f"{owner}: {kind} must be {metadata_type.__name__} or a mapping of its "
                    f"settings, got {type(metadata).__name__}"
                )
            if metadata.num_layers != count:
                raise ValueError(
                    f"{owner}: {kind}.num_layers must equal the {count} layer(s) of kind "
                    f"{kind!r}, got {metadata.num_layers}"
                )
            batch_sizes.add(metadata.batch_size)
        if len(batch_sizes) > 1:
            raise ValueError(
                f"{owner}: every kind must have the same batch_size, got {sorted(batch_sizes)}"
            )
        if self.attention is not None and self.attention.sliding_window is not None:
            raise ValueError(
                f"{owner}: attention.sliding_window must be None (use sliding_attention), "
                f"got {self.attention.sliding_window}"
            )
        if self.sliding_attention is not None and self.sliding_attention.sliding_window is None:
            raise ValueError(f"{owner}: sliding_attention.sliding_window must be set, got None")

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def batch_size(self) -> int | None:
        """Rows of the cache (``None`` when every layer is ``"none"``)."""
        for kind in KIND_METADATA:
            metadata = getattr(self, kind)
            if metadata is not None:
                return metadata.batch_size
        return None

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
    """Runtime metadata of one forward pass through a hybrid stack.

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
        ``rows``: ``[batch]`` bool mask or a sequence of row ids."""
        return self.with_views(
            view if view is None else view.reset_rows(rows) for view in self.views
        )

    def lengths(self) -> jax.Array:
        """``[batch]`` int32 tokens seen per row (from the first layer that keeps a state)."""
        for view in self.views:
            if view is not None:
                return view.lengths
        raise ValueError("HybridCache.lengths: the cache has no initialised views")

    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where an attention write did not fit (recurrent layers never
        overflow)."""
        batch = self.metadata.batch_size or 0
        flags = [
            view.overflow
            for view, kind in zip(self.views, self.metadata.layer_kinds, strict=True)
            if view is not None and kind in ATTENTION_KINDS
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
