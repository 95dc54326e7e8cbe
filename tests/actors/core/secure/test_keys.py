"""The node's key file: created once with mode 0600, read back identically, refused (never replaced) when unusable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from villagemesh.actors.core.secure.keys import KEY_FILE_BYTES, NodeKeys
from villagemesh.errors import ConfigError
from villagemesh.protocols.discovery import node_id_from_public_key


def test_keys_are_created_once_and_read_back_identically(tmp_path: Path) -> None:
    """The first call creates the file; the next returns the same identity and static key."""
    path = tmp_path / "data" / "node.key"
    created = NodeKeys.load_or_create(path)
    again = NodeKeys.load_or_create(path)
    assert again.to_bytes() == created.to_bytes()
    assert again.node_id == created.node_id
    assert path.read_bytes() == created.to_bytes() and len(created.to_bytes()) == KEY_FILE_BYTES
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary file left behind


def test_key_file_is_private_to_its_owner(tmp_path: Path) -> None:
    """The key file is mode 0600 and a directory it had to create is 0700, whatever the umask."""
    old = os.umask(0)
    try:
        NodeKeys.load_or_create(tmp_path / "fresh" / "node.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh" / "node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700


def test_node_id_is_derived_from_the_identity_key() -> None:
    """node_id is node_id_from_public_key of the Ed25519 verify key, as discovery computes it."""
    keys = NodeKeys(SigningKey(bytes([5]) * 32), bytes([6]) * 32)
    assert keys.node_id == node_id_from_public_key(bytes(keys.signing_key.verify_key))
    assert keys.identity == bytes(keys.signing_key.verify_key)
    assert len(keys.static_public) == 32 and keys.static_public != keys.static_key


def test_repr_does_not_show_private_keys() -> None:
    """A logged NodeKeys shows its node id, never a private key."""
    keys = NodeKeys(SigningKey(bytes([5]) * 32), bytes([6]) * 32)
    assert repr(keys) == f"NodeKeys(node_id={keys.node_id!r})"


@pytest.mark.parametrize("size", [0, 32, 63, 65, 128])
def test_key_file_of_the_wrong_size_is_refused_naming_the_path_and_never_replaced(tmp_path: Path, size: int) -> None:
    """A truncated or padded key file stops the node instead of giving it a new identity."""
    path = tmp_path / "node.key"
    content = os.urandom(size)
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"{path}.*{size} bytes"):
        NodeKeys.load_or_create(path)
    assert path.read_bytes() == content


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A key file with group or world permissions is refused, as ssh refuses an unprotected private key."""
    path = tmp_path / "node.key"
    NodeKeys.load_or_create(path)
    before = path.read_bytes()
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"{path} has mode 0644"):
        NodeKeys.load_or_create(path)
    assert path.read_bytes() == before


def test_a_directory_where_the_key_file_should_be_is_refused(tmp_path: Path) -> None:
    """A path that is not a regular file is a ConfigError naming it."""
    path = tmp_path / "node.key"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=str(path)):
        NodeKeys.load_or_create(path)


def test_a_dangling_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    """load_or_create does not create keys through a symlink somebody left in the data dir."""
    path = tmp_path / "node.key"
    path.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(ConfigError, match=str(path)):
        NodeKeys.load_or_create(path)
    assert not (tmp_path / "elsewhere.key").exists()


def test_creation_never_overwrites_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    """Creating over an existing file fails (the caller then loads the winner's keys) and leaves no temp file."""
    path = tmp_path / "node.key"
    winner = NodeKeys.load_or_create(path)
    with pytest.raises(FileExistsError):
        NodeKeys.generate()._create(path)
    assert NodeKeys.load(path).to_bytes() == winner.to_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


@pytest.mark.parametrize(
    ("signing_key", "static_key", "named"),
    [(b"x" * 32, bytes(32), "signing_key"), (SigningKey(bytes(32)), b"short", "static_key")],
)
def test_keys_of_the_wrong_type_or_size_are_config_errors(signing_key: object, static_key: object, named: str) -> None:
    """NodeKeys validates its fields and names the bad one."""
    with pytest.raises(ConfigError, match=named):
        NodeKeys(signing_key, static_key)  # type: ignore[arg-type]
