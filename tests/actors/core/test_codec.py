"""The bus codec: registered frozen dataclasses only, every field checked, never pickle."""

from __future__ import annotations

import enum
from dataclasses import dataclass, make_dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.core import codec
from villagemesh.errors import CodecError, ConfigError


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@codec.message("codec_test.Inner")
@dataclass(frozen=True, slots=True)
class Inner:
    x: int
    tags: tuple[str, ...]


@codec.message("codec_test.Everything")
@dataclass(frozen=True, slots=True)
class Everything:
    i: int
    f: float
    s: str
    b: bytes
    flag: bool
    maybe: int | None
    pair: tuple[int, str]
    many: tuple[bytes, ...]
    table: dict[str, float]
    colour: Colour
    inner: Inner
    inners: tuple[Inner, ...]


@codec.message("codec_test.Empty")
@dataclass(frozen=True, slots=True)
class Empty:
    pass


inners = st.builds(Inner, st.integers(-(2**63), 2**64 - 1), st.tuples(st.text()).map(tuple) | st.just(()))
everything = st.builds(
    Everything,
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.booleans(),
    st.none() | st.integers(0, 10),
    st.tuples(st.integers(0, 5), st.text(max_size=5)),
    st.lists(st.binary(max_size=8), max_size=4).map(tuple),
    st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False), max_size=4),
    st.sampled_from(Colour),
    inners,
    st.lists(inners, max_size=3).map(tuple),
)


@given(everything)
def test_every_supported_field_type_round_trips(msg):
    """decode(encode(m)) == m for messages using every supported field type."""
    assert codec.decode(codec.encode(msg)) == msg


def test_a_message_without_fields_round_trips():
    """A field-less message is just its tag."""
    assert codec.decode(codec.encode(Empty())) == Empty()


def test_trusted_decoding_shares_the_one_instance_of_a_field_less_message():
    """A message without fields is a value: trusted decoding returns its one instance, checked decoding a new one."""
    values = ("codec_test.Empty",)
    assert codec.from_values(values, trusted=True) is codec.from_values(values, trusted=True)
    assert codec.from_values(values) == Empty()


def test_a_reused_packer_encodes_as_pack_does_and_recovers_from_a_refusal():
    """packer() gives pack's bytes; a value it refuses (a lone surrogate) leaves it ready for the next."""
    pack = codec.packer()
    msg = Inner(1, ("a",))
    assert codec.to_values(msg, 9, None) == (9, None, "codec_test.Inner", 1, ("a",))
    assert pack(codec.to_values(msg)) == codec.encode(msg)
    with pytest.raises(codec.PACK_ERRORS) as info:
        pack(codec.to_values(Inner(2, ("\ud800",))))
    assert "surrogates" in str(codec.pack_error(Inner, info.value))
    with pytest.raises(CodecError, match="surrogates"):
        codec.encode(Inner(2, ("\ud800",)))
    assert pack(codec.to_values(msg)) == codec.encode(msg)


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_codec_error_only(data):
    """Arbitrary bytes never raise anything but CodecError."""
    try:
        codec.decode(data)
    except CodecError:
        pass


@given(everything, st.data())
def test_a_field_of_the_wrong_type_is_refused_naming_it(msg, data):
    """Swapping one field's value for another type's gives CodecError with the field's name."""
    values = list(codec.unpack(codec.encode(msg)))
    index = data.draw(st.sampled_from([1, 3, 4, 5, 10]))
    values[index] = {1: "str"} if index != 1 else "not an int"
    with pytest.raises(CodecError) as info:
        codec.from_values(tuple(values))
    assert "Everything." in str(info.value)


def test_wrong_arity_and_unknown_tags_are_refused():
    """A frame with too few fields or an unknown tag names the problem."""
    with pytest.raises(CodecError, match="expected 2 field"):
        codec.from_values(("codec_test.Inner", 1))
    with pytest.raises(CodecError, match="'nope'"):
        codec.from_values(("nope",))
    with pytest.raises(CodecError, match="non-empty array"):
        codec.from_values(())


def test_unregistered_values_cannot_be_encoded():
    """Only registered messages go on the wire; never a pickled object."""

    @dataclass(frozen=True)
    class Stranger:
        x: int

    with pytest.raises(CodecError, match="Stranger"):
        codec.encode(Stranger(1))
    with pytest.raises(CodecError):
        codec.pack({"x": object()})
    with pytest.raises(CodecError, match="Stranger"):
        codec.tag_of(Stranger)


def test_registration_refuses_what_the_wire_cannot_carry():
    """Non-frozen classes, taken tags, Any, bad unions and non-str keys fail at registration."""
    from typing import Any

    @dataclass
    class Mutable:
        x: int

    with pytest.raises(ConfigError, match="frozen"):
        codec.message("codec_test.Mutable")(Mutable)

    @dataclass(frozen=True)
    class Other:
        x: int

    with pytest.raises(ConfigError, match="already used"):
        codec.message("codec_test.Inner")(Other)
    with pytest.raises(ConfigError, match="non-empty"):
        codec.message("")(Other)

    for i, annotation in enumerate((Any, int | str, dict[int, int], list[int], set[int], "Undefined")):
        bad = make_dataclass(f"Bad{i}", [("x", annotation)], frozen=True)
        with pytest.raises(ConfigError):
            codec.message(f"codec_test.Bad{i}")(bad)


def test_registry_knows_tags_and_classes():
    """tag_of, is_message and registered_tags describe the registry."""
    assert codec.tag_of(Inner) == "codec_test.Inner"
    assert codec.is_message(Inner(1, ())) and not codec.is_message(1)
    assert "codec_test.Everything" in codec.registered_tags()
