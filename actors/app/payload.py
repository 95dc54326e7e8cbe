"""Payload codecs: how application values become envelope payload bytes and back.

A codec is any object with two methods (:class:`PayloadCodec`)::

    encode(value) -> bytes        raises on a value it cannot carry
    decode(data: bytes) -> value  raises on bytes it cannot read

Three come with villagemesh, named by a string in ``create_network(codec=...)``:
``"bytes"`` (the default: payloads are bytes-like and arrive as ``bytes``),
``"json"`` (UTF-8 JSON) and ``"msgpack"``. Errors of either method are
:class:`~villagemesh.errors.ConfigError` when sending (the caller's value) and
reported to the sender as a failed handler when receiving.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

import msgpack

from villagemesh.errors import ConfigError

__all__ = ["CODECS", "BytesCodec", "JsonCodec", "MsgpackCodec", "PayloadCodec", "payload_codec"]


@runtime_checkable
class PayloadCodec(Protocol):
    """The two-method protocol of a payload codec."""

    def encode(self, value: Any) -> bytes:
        """``value`` as payload bytes."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value in payload bytes ``data``."""
        ...


class BytesCodec:
    """Payloads are bytes-like on the way out and ``bytes`` on the way in."""

    name = "bytes"

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ConfigError(f"payload must be bytes-like with the bytes codec, got {type(value).__name__}")
        return bytes(value)

    def decode(self, data: bytes) -> bytes:
        return data


class JsonCodec:
    """UTF-8 JSON (compact separators)."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"payload {value!r:.80} is not JSON-serialisable: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackCodec:
    """msgpack (bytes stay bytes, tuples become lists)."""

    name = "msgpack"

    def encode(self, value: Any) -> bytes:
        try:
            return bytes(msgpack.packb(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"payload {value!r:.80} is not msgpack-serialisable: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data)


CODECS: dict[str, PayloadCodec] = {c.name: c for c in (BytesCodec(), JsonCodec(), MsgpackCodec())}
"""The codecs a name selects."""


def payload_codec(codec: str | PayloadCodec) -> PayloadCodec:
    """The codec ``codec`` names, or ``codec`` itself when it has both methods."""
    if isinstance(codec, str):
        try:
            return CODECS[codec]
        except KeyError:
            raise ConfigError(f"unknown payload codec {codec!r}; known: {sorted(CODECS)}") from None
    if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise ConfigError(f"a payload codec needs encode(value) -> bytes and decode(bytes), got {codec!r}")
    return codec
