"""The four abstractions every jaxkv cache is built on, and the PyTree machinery they share.

* ``BaseCacheMetadata`` -- validated, immutable configuration of one cache (every field static).
* ``BaseRunTimeMetadata`` -- per-forward-pass data the cache does not store (array leaves).
* ``BaseCacheView`` -- the state of ONE layer plus its ``metadata`` and ``layer_index``.
* ``BaseCache`` -- the sequence of views, one per layer (``None`` where a layer keeps nothing).

On top of them, the protocols every family speaks: ``AttentionCacheView`` (keys and values),
``StateCacheView`` (recurrent state) and ``RowOperations`` (``reset_rows``, ``truncate``,
``rollback``, ``select``, ``reorder``, ``repeat``, ``insert``, ``extract``, ``overflow_rows``,
``check_overflow``). Models and the engine are written against these, never against a family.

``pytree_dataclass`` turns a subclass into a frozen dataclass registered as a JAX PyTree;
``static_field`` marks a field as part of the tree definition instead of a leaf. Metadata and
runtime metadata share ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` / ``replace``
(the ``Serializable`` mixin), whose round trips are exact for Python scalars, strings, ``None``,
tuples, nested serializable dataclasses, dtypes (bfloat16 included) and arrays.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T", bound="Serializable")

_STATIC = "jaxkv_static"


def static_field(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that is static: part of the PyTree definition, not a leaf.

    Static values must be hashable; a change of a static value retraces a jitted function.
    Accepts the keyword arguments of ``dataclasses.field``.
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_STATIC] = True
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _is_static(cls: type, field: dataclasses.Field) -> bool:
    return field.metadata.get(_STATIC, False) or issubclass(cls, BaseCacheMetadata)


def pytree_dataclass(cls: type) -> type:
    """Make ``cls`` a frozen dataclass registered as a JAX PyTree.

    Fields declared with ``static_field`` (and every field of a ``BaseCacheMetadata``
    subclass) go into the tree definition; the others are children. Metadata classes compare
    by value and are hashable, so ``jax.jit`` can specialise on them; other classes compare by
    identity (their leaves are arrays). Unflattening bypasses ``__init__``, so transformations
    may put any object in a leaf position.
    """
    if not isinstance(cls, type):
        raise TypeError(f"pytree_dataclass expects a class, got {cls!r}")
    is_metadata = issubclass(cls, BaseCacheMetadata)
    cls = dataclasses.dataclass(frozen=True, eq=is_metadata)(cls)
    fields = dataclasses.fields(cls)
    data_names = tuple(f.name for f in fields if not _is_static(cls, f))
    static_names = tuple(f.name for f in fields if _is_static(cls, f))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data_names)

    def flatten_with_keys(obj):
        children = [(key, getattr(obj, name)) for key, name in zip(keys, data_names, strict=True)]
        aux = tuple(getattr(obj, name) for name in static_names)
        return children, aux

    def flatten(obj):
        children = [getattr(obj, name) for name in data_names]
        aux = tuple(getattr(obj, name) for name in static_names)
        return children, aux

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for name, value in zip(static_names, aux, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(data_names, children, strict=True):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    cls.__jaxkv_pytree__ = True
    return cls


# --------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    """Python value -> ``to_dict`` form: nested serializables become dicts, arrays NumPy."""
    if isinstance(value, Serializable):
        return value.to_dict()
    if isinstance(value, tuple):
        return tuple(_encode(item) for item in value)
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, jax.Array):
        return np.asarray(value)
    return value


def _json_default(value: Any) -> Any:
    raise TypeError(f"cannot serialise a value of type {type(value).__name__} to JSON: {value!r}")


def _to_json_tree(value: Any) -> Any:
    """``to_dict`` form -> JSON-compatible form with tagged tuples, dtypes and arrays."""
    if isinstance(value, dict):
        return {key: _to_json_tree(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json_tree(item) for item in value]}
    if isinstance(value, list):
        return [_to_json_tree(item) for item in value]
    if isinstance(value, np.ndarray):
        contiguous = np.asarray(value, order="C")  # keeps 0-d arrays 0-d
        return {
            "__array__": {
                "dtype": contiguous.dtype.name,
                "shape": list(contiguous.shape),
                "data": base64.b64encode(contiguous.tobytes()).decode("ascii"),
            }
        }
    if isinstance(value, np.dtype):
        return {"__dtype__": value.name}
    scalar_type = _scalar_type_tag(value)
    if scalar_type is not None:
        return {"__scalar_type__": scalar_type}
    if isinstance(value, np.generic):
        return {"__scalar__": {"dtype": value.dtype.name, "value": value.item()}}
    return value


def _from_json_tree(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json_tree(item) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tuple__"}:
        return tuple(_from_json_tree(item) for item in value["__tuple__"])
    if set(value) == {"__dtype__"}:
        return np.dtype(_dtype_from_name(value["__dtype__"]))
    if set(value) == {"__scalar_type__"}:
        return _scalar_type_from_tag(value["__scalar_type__"])
    if set(value) == {"__scalar__"}:
        spec = value["__scalar__"]
        return np.dtype(_dtype_from_name(spec["dtype"])).type(spec["value"])
    if set(value) == {"__array__"}:
        spec = value["__array__"]
        dtype = np.dtype(_dtype_from_name(spec["dtype"]))
        raw = base64.b64decode(spec["data"].encode("ascii"))
        return np.frombuffer(raw, dtype=dtype).reshape(spec["shape"]).copy()
    return {key: _from_json_tree(item) for key, item in value.items()}


def _scalar_type_tag(value: Any) -> dict[str, str] | None:
    """``{"module": "jax.numpy" | "numpy", "name": ...}`` for a scalar *type* such as
    ``jnp.bfloat16`` or ``np.float32`` (EasyDeL-style configs hold those), else ``None``."""
    if not isinstance(value, type):
        return None
    try:
        name = np.dtype(value).name
    except TypeError:
        return None
    if getattr(jax.numpy, name, None) is value:
        return {"module": "jax.numpy", "name": name}
    if issubclass(value, np.generic) and np.dtype(value).type is value:
        return {"module": "numpy", "name": name}
    return None


def _scalar_type_from_tag(tag: Any) -> type:
    if not isinstance(tag, dict) or set(tag) != {"module", "name"}:
        raise ValueError(f"malformed scalar type tag {tag!r}")
    if tag["module"] == "jax.numpy":
        scalar_type = getattr(jax.numpy, tag["name"], None)
        if not isinstance(scalar_type, type):
            raise ValueError(f"unknown jax.numpy scalar type {tag['name']!r}")
        return scalar_type
    if tag["module"] == "numpy":
        return np.dtype(_dtype_from_name(tag["name"])).type
    raise ValueError(f"unknown scalar type module {tag['module']!r} (expected jax.numpy or numpy)")


def _dtype_from_name(name: str) -> Any:
    """Resolve a dtype name, including the ml_dtypes ones (bfloat16, float8_*, int4)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # shipped with jax

        if not hasattr(ml_dtypes, name):
            raise ValueError(f"unknown dtype name {name!r}") from None
        return np.dtype(getattr(ml_dtypes, name))


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is acceptable for a field annotated ``annotation`` (shallow check)."""
    if annotation is Any or annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None) or annotation is None:
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(item, args[0]) for item in value)
        if args and len(args) != len(value):
            return False
        return all(_type_ok(item, arg) for item, arg in zip(value, args, strict=False))
    if origin is not None:
        return isinstance(value, origin)
    if annotation is bool:
        return isinstance(value, bool | np.bool_)
    if annotation is int:
        return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if annotation is float:
        return isinstance(value, float | int | np.floating | np.integer) and not isinstance(
            value, bool
        )
    if annotation is np.dtype:
        return isinstance(value, np.dtype)
    if annotation is jax.Array:
        return isinstance(value, jax.Array | np.ndarray | np.generic)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _field_types(cls: type) -> dict[str, Any]:
    module = __import__(cls.__module__, fromlist=["_"])
    namespace = dict(vars(module))
    namespace.setdefault("jax", jax)
    namespace.setdefault("np", np)
    return typing.get_type_hints(cls, globalns=namespace)


def _decode_field(cls: type, name: str, value: Any, annotation: Any) -> Any:
    """Turn a ``to_dict`` value back into the field's Python value, checking its type."""
    nested = _serializable_type(annotation)
    if nested is not None and isinstance(value, dict):
        return nested.from_dict(value)
    if isinstance(value, list) and typing.get_origin(annotation) is not list:
        value = tuple(value)
    if isinstance(value, np.ndarray) and not _is_static_name(cls, name):
        value = jax.numpy.asarray(value)
    if not _type_ok(value, annotation):
        raise TypeError(
            f"{cls.__name__}.from_dict: field {name!r} expects {_describe(annotation)}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _is_static_name(cls: type, name: str) -> bool:
    return any(f.name == name and _is_static(cls, f) for f in dataclasses.fields(cls))


def _serializable_type(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, Serializable):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            if isinstance(arm, type) and issubclass(arm, Serializable):
                return arm
    return None


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


class Serializable:
    """``to_dict``/``from_dict``/``to_json``/``from_json``/``replace`` for PyTree dataclasses.

    ``to_dict`` returns ``{field: value}`` with nested serializable dataclasses as dicts and
    arrays as NumPy arrays; ``to_json`` additionally tags tuples, dtypes and arrays (dtype, shape
    and base64 bytes) so that ``from_json(to_json(x))`` restores them exactly.
    """

    def to_dict(self) -> dict[str, Any]:
        """Serializes the PyTree object to a dictionary."""
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Deserializes a dictionary into a PyTree object.

        Raises ``ValueError`` for an unknown or missing field and ``TypeError`` for a value of
        the wrong type; the object is either built whole or not at all.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict: unknown field(s) {unknown}; expected {sorted(fields)}"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{cls.__name__}.from_dict: missing required field(s) {missing}")
        hints = _field_types(cls)
        kwargs = {
            name: _decode_field(cls, name, value, hints.get(name, Any))
            for name, value in data.items()
        }
        return cls._construct(kwargs)

    def to_json(self, **kwargs: Any) -> str:
        """Serializes the PyTree object to a JSON string (keyword arguments go to json.dumps)."""
        return json.dumps(_to_json_tree(self.to_dict()), default=_json_default, **kwargs)

    @classmethod
    def from_json(cls: type[T], json_str: str) -> T:
        """Deserializes a JSON string into a PyTree object."""
        if not isinstance(json_str, str | bytes | bytearray):
            raise TypeError(
                f"{cls.__name__}.from_json expects a JSON string, got {type(json_str).__name__}"
            )
        try:
            data = json.loads(json_str)
        except json.JSONDecodeError as error:
            raise ValueError(f"{cls.__name__}.from_json: invalid JSON ({error})") from error
        return cls.from_dict(_from_json_tree(data))

    def replace(self: T, **kwargs: Any) -> T:
        """Creates a new instance with specified fields replaced (validated like the original)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.replace: unknown field(s) {unknown}; "
                f"expected {sorted(names)}"
            )
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        fields.update(kwargs)
        return type(self)._construct(fields)

    @classmethod
    def _construct(cls: type[T], fields: dict[str, Any]) -> T:
        """Build an instance from field values (``from_dict`` and ``replace`` come here)."""
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# The four abstractions
# --------------------------------------------------------------------------------------------


class BaseCacheMetadata(Serializable, abc.ABC):
    """Abstract base class defining the interface for cache metadata.

    Concrete classes are ``@pytree_dataclass`` dataclasses whose every field is static (so
    metadata is hashable and a jit specialises on it). Build them with ``create(...)``, which
    normalises arguments and validates; ``validate`` runs on every construction path
    (``create``, ``replace``, ``from_dict``) and raises ``ValueError`` naming the bad field.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise ``ValueError`` naming the field if this configuration is invalid. Only checks:
        defaults that depend on other fields are filled by ``fill_defaults``."""

    @classmethod
    def fill_defaults(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Field values with the defaults that depend on other fields filled in (and values
        normalised, e.g. ``jnp.bfloat16`` -> ``np.dtype("bfloat16")``); ``create``, ``replace``
        and ``from_dict`` all pass through it before ``validate``. Identity by default."""
        return fields

    @classmethod
    def _construct(cls, fields: dict[str, Any]) -> BaseCacheMetadata:
        return cls(**cls.fill_defaults(dict(fields)))

    @classmethod
    @abc.abstractmethod
    def create(cls, *args: Any, **kwargs: Any) -> BaseCacheMetadata:
        """Factory method to create validated metadata instance.

        Raises:
            ValueError: If any validation checks fail.
        """


class BaseRunTimeMetadata(Serializable):
    """Base class for optional runtime metadata used during attention computation.

    Holds what one forward pass needs and the cache does not store (positions, page tables,
    slot mappings, query offsets). Concrete classes are ``@pytree_dataclass`` dataclasses whose
    arrays are leaves and whose sizes and flags are ``static_field``\\ s.
    """


class BaseCacheView(abc.ABC):
    """Abstract base class for a single cache view (typically per layer).

    Stores the cached states of one layer, tracks its positions and updates functionally:
    ``concatenate_to_cache`` returns a new view and never mutates this one.
    """

    metadata: BaseCacheMetadata
    layer_index: int | None

    @classmethod
    @abc.abstractmethod
    def init(cls, metadata: BaseCacheMetadata, *args: Any, **kwargs: Any) -> BaseCacheView:
        """Initialize a new cache view instance for ``metadata``."""

    @abc.abstractmethod
    def concatenate_to_cache(self, *args: Any, **kwargs: Any) -> Any:
        """Write new states; return a tuple of what the consumer needs and the new view."""


# --------------------------------------------------------------------------------------------
# The protocols every family speaks (on top of the four abstractions)
# --------------------------------------------------------------------------------------------


class RowOperations(abc.ABC):
    """The row operations every cache family offers, on its views and on its caches, with the
    same names and meaning everywhere. Each returns a new object (nothing is mutated) and works
    under ``jax.jit`` where the shapes allow (``select``, ``repeat`` and ``extract`` change the
    number of rows, so their arguments must then be static). An operation a family cannot do
    raises ``jaxkv.errors.UnsupportedOperationError`` naming the family and the reason.

    ``rows`` arguments are a ``[batch]`` bool mask or a sequence of row ids. Out-of-range row ids
    are refused eagerly; under ``jit`` (where nothing can raise) they touch no row.
    """

    @abc.abstractmethod
    def reset_rows(self, rows: Any) -> Any:
        """The selected rows become empty (a batch slot is reused by a new sequence)."""

    @abc.abstractmethod
    def truncate(self, lengths: Any) -> Any:
        """Each row keeps only its first ``lengths[b]`` tokens (``lengths: [batch]`` ints, each
        at most the row's length): rollback. Rings and recurrent states can go back only as far
        as their metadata's ``rollback_depth`` keeps; past it, eagerly a ``ValueError``, under
        ``jit`` the row keeps its tokens and is flagged (``overflow_rows``)."""

    @abc.abstractmethod
    def rollback(self, n: Any) -> Any:
        """Each row forgets its last ``n`` tokens (``n``: an int or ``[batch]`` ints ``>= 0``):
        ``truncate(lengths - n)``, e.g. the draft tokens a speculative-decoding verifier
        rejected."""

    @abc.abstractmethod
    def select(self, rows: Sequence[int]) -> Any:
        """Only the given distinct rows, in this order (drop finished rows)."""

    @abc.abstractmethod
    def reorder(self, indices: Any) -> Any:
        """Row ``b`` of the result is row ``indices[b]`` (``[batch]`` ints, duplicates allowed):
        beam search."""

    @abc.abstractmethod
    def repeat(self, n: int) -> Any:
        """Every row repeated ``n`` times, interleaved (``0, 0, 1, 1, ...``): parallel samples."""

    @abc.abstractmethod
    def insert(self, other: Any, slot: Any) -> Any:
        """Row ``slot`` replaced by the single row of ``other`` (a one-row cache of the same
        family and configuration): a sequence prefilled elsewhere joins a decode batch."""

    @abc.abstractmethod
    def extract(self, slot: Any) -> Any:
        """Row ``slot`` as a one-row cache of the same family (``self`` is unchanged)."""

    @abc.abstractmethod
    def overflow_rows(self) -> jax.Array:
        """``[batch]`` bool: rows where some write did not fit and was dropped."""

    @abc.abstractmethod
    def check_overflow(self) -> None:
        """Raise ``jaxkv.errors.CacheOverflowError`` if any row overflowed (call after a jitted
        step; eager writes raise at once)."""


class AttentionCacheView(BaseCacheView):
    """The attention-view protocol: a layer whose cache holds keys and values.

    A model writes the new keys/values of a layer and reads what attention needs in one call::

        positions = view.query_positions(runtime, num_tokens)   # for RoPE, before the write
        kv, view = view.concatenate_to_cache(key, value, runtime)
        out = jaxkv.ops.attention(query, kv)

    The token layout is the family's (``[batch, T]`` rows for contiguous and ring caches, one
    packed ``[num_tokens]`` axis for a paged step); ``key``/``value`` carry it as their leading
    axes, ``runtime`` says which tokens are real, and ``kv`` is whatever the family's attention
    kernel reads (``jaxkv.kv.CachedKV`` or ``jaxkv.kv.PagedKV``).
    """

    @abc.abstractmethod
    def query_positions(self, runtime: Any, num_tokens: int) -> jax.Array:
        """Absolute positions the next write gives its ``num_tokens`` tokens (``-1`` for
        padding), laid out like the tokens; nothing is written."""

    @abc.abstractmethod
    def concatenate_to_cache(self, key: Any, value: Any, runtime: Any = None) -> Any:
        """Write the new keys and values; return ``(kv, new_view)``: what attention reads (the
        new tokens included) and the view holding them."""


class StateCacheView(BaseCacheView):
    """The state-view protocol: a layer whose cache holds a recurrent state (Mamba, Mamba2,
    linear attention) instead of one entry per token.

    A layer runs ``T`` new tokens per row in two calls, and nothing is computed twice::

        step = view.read(runtime, num_tokens, conv_input)  # state to start from, masks, conv
        ... the layer computes its outputs and each row's state after its last real token ...
        step, view = view.concatenate_to_cache(step, state)

    ``read`` writes nothing; it computes everything the write needs as well (the shifted conv
    window travels in the step), so ``concatenate_to_cache`` only stores the step's conv state
    and the given ``state`` for rows with at least one real token, and advances the row lengths.
    It returns the step it was given, so that every view's ``concatenate_to_cache`` has the same
    ``(what the layer reads, new view)`` shape. A view whose metadata has ``rollback_depth > 0``
    also takes ``token_states: [batch, T, ...]``, the state after every token, and keeps the last
    ``rollback_depth`` of them as checkpoints for ``truncate``::

        step, view = view.concatenate_to_cache(step, state, token_states)
    """

    @abc.abstractmethod
    def read(self, runtime: Any, num_tokens: int, conv_input: Any = None) -> Any:
        """What the layer needs to run ``num_tokens`` tokens per row (nothing is written)."""

    @abc.abstractmethod
    def concatenate_to_cache(self, step: Any, state: Any, token_states: Any = None) -> Any:
        """Store ``step``'s conv state and ``state`` (and, with ``rollback_depth``, checkpoints
        from ``token_states``); return ``(step, new_view)``."""


class BaseCache(abc.ABC):
    """Abstract base class for the main cache container: one view per layer.

    ``cache[i]``, ``len(cache)`` and iteration go over ``views``; ``replace_view(i, view)``
    returns a new cache with layer ``i`` replaced (caches are immutable).
    """

    views: Sequence[BaseCacheView | None]

    @classmethod
    @abc.abstractmethod
    def init_cache(cls, metadata: BaseCacheMetadata, *args: Any, **kwargs: Any) -> BaseCache:
        """Initialize a complete cache with views for all layers."""

    @classmethod
    @abc.abstractmethod
    def init_empty(cls, *args: Any, **kwargs: Any) -> BaseCache:
        """Initialize an empty cache container (uninitialised ``None`` views)."""

    def __getitem__(self, index: int) -> BaseCacheView | None:
        return self.views[index]

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[BaseCacheView | None]:
        return iter(self.views)

    def __setitem__(self, index: int, view: BaseCacheView | None) -> None:
        raise TypeError(
            f"{type(self).__name__} is immutable: cache[{index!r}] = view cannot work under jit; "
            f"use cache = cache.replace_view({index!r}, view), which returns a new cache"
        )

    def replace_view(self, index: int, view: BaseCacheView | None) -> BaseCache:
        """A new cache whose layer ``index`` is ``view``; the other views are shared."""
        if not isinstance(index, int | np.integer) or isinstance(index, bool):
            raise TypeError(f"replace_view: index must be an int, got {index!r}")
        if not -len(self.views) <= index < len(self.views):
            raise IndexError(
                f"replace_view: index {index} out of range for a cache of {len(self.views)} views"
            )
        views = list(self.views)
        views[index] = view
        return self.with_views(views)

    def with_views(self, views: Sequence[BaseCacheView | None]) -> BaseCache:
        """A new cache of the same type holding ``views`` (same number of layers)."""
        views = tuple(views)
        if len(views) != len(self.views):
            raise ValueError(f"with_views: expected {len(self.views)} views, got {len(views)}")
        return dataclasses.replace(self, views=views)
