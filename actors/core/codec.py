"""Typed bus messages and their explicit binary codec (msgpack; never pickle).

A bus message is a frozen dataclass registered under a stable *tag*::

    @message("registry.PeerSeen")
    @dataclass(frozen=True, slots=True)
    class PeerSeen:
        peer_id: str
        addresses: tuple[str, ...]
        last_seen: float

On the wire a message is the msgpack array ``[tag, field1, field2, ...]`` in
field order. The tag, not the Python class path, names the type, so a class can
move between modules without breaking a peer process that still runs the old
code. Decoding checks the arity and the type of every field against the
annotations, so a frame from a buggy or hostile process cannot build a
half-typed message: it raises :class:`~villagemesh.errors.CodecError` naming the
field.

Field types the codec understands (anything else is refused at registration,
not at first use): ``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``,
``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, ``enum.Enum``
subclasses (sent as their value), and other registered message classes (sent
as a nested array).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import msgpack

from villagemesh.errors import CodecError, ConfigError

__all__ = ["decode", "encode", "is_message", "message", "registered_tags", "tag_of"]

T = TypeVar("T")

_Check = Callable[[Any], Any]
"""Converts a decoded msgpack value to the field's type, or raises CodecError."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    tag: str
    cls: type
    fields: tuple[str, ...]
    getter: Callable[[Any], Any]
    checks: tuple[_Check, ...]
    converts: tuple[_Check | None, ...]
    """For trusted frames: only the fields whose wire form is not their value (enums,
    nested messages) are converted; ``plain`` when there are none."""
    plain: bool
    only: Any
    """For a class without fields, its one instance (trusted decoding returns it: messages
    are immutable values); otherwise None."""


_BY_TAG: dict[str, _Spec] = {}
_BY_CLASS: dict[type, _Spec] = {}


def message(tag: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a bus message under ``tag``.

    Raises :class:`ConfigError` when the class is not a frozen dataclass, the tag is
    taken by another class, or a field has a type the codec cannot carry.
    """

    def register(cls: type[T]) -> type[T]:
        if not isinstance(tag, str) or not tag:
            raise ConfigError(f"message tag must be a non-empty string, got {tag!r}")
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise ConfigError(f"{cls.__qualname__} must be a frozen dataclass to be a bus message")
        existing = _BY_TAG.get(tag)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise ConfigError(f"message tag {tag!r} is already used by {existing.cls.__qualname__}")
        try:
            hints = get_type_hints(cls)
        except (NameError, TypeError) as exc:
            raise ConfigError(f"{cls.__qualname__}: its field annotations cannot be resolved: {exc}") from exc
        names = tuple(f.name for f in dataclasses.fields(cls))
        checks = tuple(_check_for(hints[name], f"{cls.__qualname__}.{name}") for name in names)
        getter = attrgetter(*names) if len(names) > 1 else _single_getter(names)
        converts = tuple(
            check if _needs_conversion(hints[name]) else None for name, check in zip(names, checks, strict=True)
        )
        only = cls() if not names else None
        spec = _Spec(tag, cls, names, getter, checks, converts, all(c is None for c in converts), only)
        _BY_TAG[tag] = spec
        _BY_CLASS[cls] = spec
        return cls

    return register


def _single_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if not names:
        return lambda _obj: ()
    get = attrgetter(names[0])
    return lambda obj: (get(obj),)


def is_message(obj: object) -> bool:
    """True when ``obj`` is an instance of a registered message class."""
    return type(obj) in _BY_CLASS


def tag_of(cls: type) -> str:
    """The tag a message class is registered under."""
    try:
        return _BY_CLASS[cls].tag
    except KeyError:
        raise CodecError(f"{cls.__qualname__} is not a registered bus message") from None


def registered_tags() -> frozenset[str]:
    """Every tag registered in this process (for diagnostics and tests)."""
    return frozenset(_BY_TAG)


# --- encoding ---------------------------------------------------------------------------


def to_values(msg: object, *head: Any) -> tuple[Any, ...]:
    """``(tag, field...)`` for ``msg``: the array that goes on the wire, after ``head``
    (a frame's header, built in the same step) when given."""
    try:
        spec = _BY_CLASS[type(msg)]
    except KeyError:
        raise CodecError(f"cannot encode {type(msg).__qualname__}: not a registered bus message") from None
    return (*head, spec.tag, *spec.getter(msg))


def _default(obj: object) -> Any:
    if type(obj) in _BY_CLASS:
        return to_values(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise CodecError(f"cannot encode a value of type {type(obj).__qualname__}: {obj!r:.80}")


PACK_ERRORS = (TypeError, ValueError, OverflowError)
"""What msgpack raises for a value it cannot encode (a CodecError from a nested value comes through as is)."""


def pack(obj: Any) -> bytes:
    """msgpack with this codec's rules for nested messages and enums."""
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except PACK_ERRORS as exc:
        raise pack_error(obj, exc) from exc


def packer() -> Callable[[Any], bytes]:
    """:func:`pack` without its per-call set-up: one reused buffer, so **for one thread only**.

    Callers catch :data:`PACK_ERRORS` and raise :func:`pack_error` (a bound
    method cannot translate its own exceptions without a wrapper's cost).
    """
    return msgpack.Packer(default=_default, use_bin_type=True).pack


def pack_error(obj: Any, exc: Exception) -> CodecError:
    """The CodecError for ``obj`` that a :func:`packer` refused with ``exc``."""
    return CodecError(f"cannot encode {obj!r:.120}: {exc}")


def unpack(data: bytes) -> Any:
    """The inverse of :func:`pack` at the msgpack level (arrays become tuples)."""
    try:
        return msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"not a msgpack value ({len(data)} bytes): {exc}") from exc


def encode(msg: object) -> bytes:
    """The wire form of one registered message."""
    return pack(to_values(msg))


def decode(data: bytes) -> Any:
    """Build the registered message encoded in ``data``; :class:`CodecError` on anything else."""
    return from_values(unpack(data))


def from_values(values: Any, *, trusted: bool = False) -> Any:
    """Build a message from its ``[tag, field...]`` array.

    Untrusted input (the default) has every field's type checked. ``trusted=True``
    is for frames made by this codec in this node (the bus checks frames where
    they enter the node): only the arity is checked and only enums and nested
    messages are converted, which makes in-node decoding several times cheaper.
    """
    if type(values) is not tuple or not values:
        raise CodecError(f"a bus message is a non-empty array, got {type(values).__name__}")
    tag = values[0]
    spec = _BY_TAG.get(tag) if type(tag) is str else None
    if spec is None:
        raise CodecError(f"unknown message tag {tag!r}")
    if len(values) - 1 != len(spec.fields):
        raise CodecError(f"{tag}: expected {len(spec.fields)} field(s), got {len(values) - 1}")
    if trusted:
        if spec.plain:
            return spec.cls(*values[1:]) if spec.only is None else spec.only
        return spec.cls(*[v if c is None else c(v) for c, v in zip(spec.converts, values[1:], strict=True)])
    return spec.cls(*[check(v) for check, v in zip(spec.checks, values[1:], strict=True)])


def _needs_conversion(tp: Any) -> bool:
    """Whether a field's decoded msgpack value differs from the value it was built from."""
    if isinstance(tp, type):
        return issubclass(tp, enum.Enum) or dataclasses.is_dataclass(tp)
    return any(_needs_conversion(arg) for arg in get_args(tp) if arg is not Ellipsis)


# --- per-field checks, built once at registration ----------------------------------------


def _check_for(tp: Any, where: str) -> _Check:
    origin = get_origin(tp)
    if tp is Any:
        raise ConfigError(f"{where}: Any is not a wire type")
    if tp in (int, float, str, bytes, bool):
        return _primitive(tp, where)
    if tp is type(None) or tp is None:
        return _exact_none(where)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if len(options) == 2 and type(None) in options:
            inner = _check_for(next(o for o in options if o is not type(None)), where)
            return lambda v: None if v is None else inner(v)
        raise ConfigError(f"{where}: only `X | None` unions are wire types, got {tp!r}")
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _check_for(args[0], where)
            return lambda v: tuple(item(x) for x in _sequence(v, where))
        checks = tuple(_check_for(a, where) for a in args)

        def fixed(v: Any) -> tuple[Any, ...]:
            seq = _sequence(v, where)
            if len(seq) != len(checks):
                raise CodecError(f"{where}: expected {len(checks)} items, got {len(seq)}")
            return tuple(c(x) for c, x in zip(checks, seq, strict=True))

        return fixed
    if origin is dict:
        key_t, val_t = get_args(tp)
        if key_t is not str:
            raise ConfigError(f"{where}: dict keys must be str on the wire, got {key_t!r}")
        val = _check_for(val_t, where)

        def mapping(v: Any) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise CodecError(f"{where}: expected a map, got {type(v).__name__}")
            return {_primitive(str, where)(k): val(x) for k, x in v.items()}

        return mapping
    if isinstance(tp, type) and issubclass(tp, enum.Enum):

        def member(v: Any) -> enum.Enum:
            try:
                return tp(v)
            except ValueError:
                raise CodecError(f"{where}: {v!r} is not a {tp.__qualname__}") from None

        return member
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):

        def nested(v: Any) -> Any:
            msg = from_values(v)
            if not isinstance(msg, tp):
                raise CodecError(f"{where}: expected {tp.__qualname__}, got {type(msg).__qualname__}")
            return msg

        return nested
    raise ConfigError(f"{where}: {tp!r} is not a wire type")


def _primitive(tp: type, where: str) -> _Check:
    if tp is float:

        def as_float(v: Any) -> float:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise CodecError(f"{where}: expected float, got {type(v).__name__}")

        return as_float

    def exact(v: Any) -> Any:
        if type(v) is tp:
            return v
        raise CodecError(f"{where}: expected {tp.__name__}, got {type(v).__name__}")

    return exact


def _exact_none(where: str) -> _Check:
    def none(v: Any) -> None:
        if v is not None:
            raise CodecError(f"{where}: expected None, got {type(v).__name__}")

    return none


def _sequence(v: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(v, tuple):
        raise CodecError(f"{where}: expected an array, got {type(v).__name__}")
    return v
