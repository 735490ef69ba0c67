"""The kinds of layer a hybrid stack mixes, one record each: which metadata class its views have
under each attention backend, which part of the hybrid runtime it takes, and its window rule.
``jaxkv.caches.hybrid`` builds, validates and runs every kind from this table alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxkv import _validation as v
from jaxkv.caches.paged import PagedCacheMetadata, PagedCacheView
from jaxkv.caches.recurrent import (
    LinearAttentionCacheMetadata,
    Mamba2CacheMetadata,
    MambaCacheMetadata,
)
from jaxkv.caches.transformer import TransformerCacheMetadata, TransformerCacheView

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


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one kind of layer is cached: one record of ``LAYER_KIND_TABLE``.

    Attributes:
        name: the kind, as written in ``layer_kinds``.
        metadata_types: the metadata class of its views per attention backend (the same class
            for both backends when the kind is not attention).
        runtime_part: the part of the hybrid runtime its views take (``"attention"`` or
            ``"recurrent"``).
        windowed: attention kinds only: whether its metadata must set ``sliding_window``
            (``True``) or leave it ``None`` (``False``); ``None`` for other kinds.
    """

    name: str
    metadata_types: Mapping[str, type]
    runtime_part: str
    windowed: bool | None = None

    def metadata_type(self, backend: str) -> type:
        return self.metadata_types[backend]

    @property
    def is_attention(self) -> bool:
        return self.runtime_part == "attention"


def _same_for_both(metadata_type: type) -> dict[str, type]:
    return {backend: metadata_type for backend in ATTENTION_BACKENDS}


LAYER_KIND_TABLE: dict[str, LayerKind] = {
    kind.name: kind
    for kind in (
        LayerKind("attention", ATTENTION_METADATA, "attention", windowed=False),
        LayerKind("sliding_attention", ATTENTION_METADATA, "attention", windowed=True),
        LayerKind("mamba", _same_for_both(MambaCacheMetadata), "recurrent"),
        LayerKind("mamba2", _same_for_both(Mamba2CacheMetadata), "recurrent"),
        LayerKind("linear_attention", _same_for_both(LinearAttentionCacheMetadata), "recurrent"),
    )
}
"""One record per kind of layer that keeps a state (``"none"`` keeps nothing)."""

LAYER_KINDS = (*LAYER_KIND_TABLE, "none")
ATTENTION_KINDS = tuple(name for name, kind in LAYER_KIND_TABLE.items() if kind.is_attention)
RECURRENT_KINDS = tuple(name for name, kind in LAYER_KIND_TABLE.items() if not kind.is_attention)

KIND_METADATA: dict[str, type] = {
    name: kind.metadata_type("contiguous") for name, kind in LAYER_KIND_TABLE.items()
}
"""The metadata class of each kind that keeps a state with the ``"contiguous"`` backend."""

PAGED_GEOMETRY = ("page_size", "batch_size", "max_pages_per_seq")
"""Paged fields that full and sliding attention layers must share (one token layout, one page-table
shape). ``num_pages`` may differ: a windowed page manager gives the sliding pool's out-of-window
pages back, so that pool can be much smaller."""


AttentionMetadata = TransformerCacheMetadata | PagedCacheMetadata


def runtime_part(runtime: Any, owner: str, kind: str) -> Any:
    """The part of a hybrid runtime that a layer of ``kind`` takes (``None`` for ``"none"``)."""
    v.require_choice(owner, "kind", kind, LAYER_KINDS)
    if kind == "none":
        return None
    return getattr(runtime, LAYER_KIND_TABLE[kind].runtime_part)
