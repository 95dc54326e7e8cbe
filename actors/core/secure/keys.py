"""The node's long-term keys: an Ed25519 identity (its node id) and an X25519 Noise static key, in one file.

File format (exactly ``KEY_FILE_BYTES`` = 64 bytes, no header)::

    offset  size  field
    0       32    Ed25519 seed           the identity: node id = node_id_from_public_key(verify key)
    32      32    X25519 private key     the secure channel's static key

Rules, each because a node's identity must never change by accident:

- **Created once, never replaced.** :meth:`NodeKeys.load_or_create` creates the
  file only when it does not exist: fresh keys go to a temporary file in the same
  directory (mode 0600, fsynced) that is then *hard-linked* to the final name,
  which fails if another process created it first (the winner's keys are loaded).
  A crash leaves either no file or a complete one, never a short one.
- **Refused, not repaired.** A file of the wrong size, a directory, an
  unreadable file, or a file group- or world-accessible (mode & 0o077, as ssh
  refuses an unprotected private key) is a :class:`ConfigError` naming the
  path; the node does not start rather than silently becoming someone else.
- The directory is created (mode 0700) when missing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base
from nacl.signing import SigningKey

from villagemesh.errors import ConfigError, StorageError
from villagemesh.protocols.discovery import node_id_from_public_key

__all__ = ["KEY_FILE_BYTES", "KEY_FILE_MODE", "NodeKeys"]

KEY_BYTES = 32
"""An Ed25519 seed and an X25519 private key are 32 bytes each."""

KEY_FILE_BYTES = 2 * KEY_BYTES
"""The key file holds the two private keys and nothing else."""

KEY_FILE_MODE = 0o600
"""Owner read/write only: the file is the node's identity."""


@dataclass(frozen=True)
class NodeKeys:
    """A node's long-term keys.

    Attributes:
        signing_key: the Ed25519 identity key; the node id is derived from its public half.
        static_key: the X25519 static private key of the Noise secure channel (32 bytes).

    Raises:
        ConfigError: a key of the wrong type or size.
    """

    signing_key: SigningKey = field(repr=False)
    static_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.signing_key, SigningKey):
            raise ConfigError(f"signing_key must be a nacl.signing.SigningKey, got {type(self.signing_key).__name__}")
        if not isinstance(self.static_key, bytes) or len(self.static_key) != KEY_BYTES:
            raise ConfigError(f"static_key must be {KEY_BYTES} bytes, got {type(self.static_key).__name__}")

    def __repr__(self) -> str:
        return f"NodeKeys(node_id={self.node_id!r})"

    @classmethod
    def generate(cls) -> NodeKeys:
        """Fresh random keys."""
        return cls(SigningKey.generate(), os.urandom(KEY_BYTES))

    @property
    def identity(self) -> bytes:
        """The Ed25519 public key (what the secure channel authenticates)."""
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        """The node id: ``node_id_from_public_key(identity)``."""
        return node_id_from_public_key(self.identity)

    @property
    def static_public(self) -> bytes:
        """The X25519 static public key."""
        return crypto_scalarmult_base(self.static_key)

    def to_bytes(self) -> bytes:
        """The 64-byte file content: Ed25519 seed || X25519 private key."""
        return bytes(self.signing_key) + self.static_key

    @classmethod
    def of(cls, value: object, *, actor: str) -> NodeKeys:
        """An actor's ``config["keys"]``: NodeKeys as they are, or their 64 bytes (a process child's config).

        Raises:
            ConfigError: neither, naming ``actor`` and what it got.
        """
        if isinstance(value, NodeKeys):
            return value
        if isinstance(value, bytes):
            return cls.from_bytes(value, source=f"the {actor} actor's config['keys']")
        got = type(value).__name__
        raise ConfigError(f"the {actor} actor needs config['keys'] (NodeKeys or its 64 bytes), got {got}")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "key data") -> NodeKeys:
        """Keys from the 64-byte file content.

        Raises:
            ConfigError: ``data`` is not exactly 64 bytes (``source`` names where it came from).
        """
        if len(data) != KEY_FILE_BYTES:
            raise ConfigError(f"{source} is {len(data)} bytes, a key file has exactly {KEY_FILE_BYTES}")
        return cls(SigningKey(data[:KEY_BYTES]), bytes(data[KEY_BYTES:]))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeKeys:
        """Read the key file at ``path``.

        Raises:
            ConfigError: the file is missing, unreadable, not a regular file,
                accessible by group or others, or not exactly 64 bytes.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConfigError(f"cannot open the key file {path}: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"key file {path} is not a regular file")
            if info.st_mode & 0o077:
                raise ConfigError(
                    f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; "
                    f"it must not be accessible by group or others (chmod 600)"
                )
            if info.st_size != KEY_FILE_BYTES:  # checked before reading: a huge file is not read in
                raise ConfigError(f"key file {path} is {info.st_size} bytes, a key file has exactly {KEY_FILE_BYTES}")
            data = os.read(fd, KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return cls.from_bytes(data, source=f"key file {path}")

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeKeys:
        """The keys in ``path``, created (mode 0600) if and only if the file does not exist.

        Raises:
            ConfigError: the file exists but is unusable (see :meth:`load`); it is never replaced.
            StorageError: new keys could not be written.
        """
        path = Path(path)
        if os.path.lexists(path):
            return cls.load(path)
        keys = cls.generate()
        try:
            keys._create(path)
        except FileExistsError:
            return cls.load(path)  # another process created it between our check and our link: its keys win
        return cls.load(path)  # read back what is on disk, through the same checks

    def _create(self, path: Path) -> None:
        """Write to a temporary file, then link it to ``path`` (FileExistsError if ``path`` appeared)."""
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except OSError as exc:
            raise StorageError(f"cannot create a key file next to {path}: {exc.strerror}") from exc
        try:
            os.fchmod(fd, KEY_FILE_MODE)  # the umask may have narrowed it further; never wider
            os.write(fd, self.to_bytes())
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.link(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except FileExistsError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot write the key file {path}: {exc.strerror}") from exc
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
