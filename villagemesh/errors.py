"""The one exception tree of villagemesh.

Every error villagemesh raises on purpose is one of these. Foreign exceptions
(``zmq.ZMQError``, ``OSError``, ``sqlite3.Error``, ``nacl.exceptions.CryptoError``)
are translated at the boundary that meets them, with ``raise ... from exc``, so
a caller can catch by meaning and still see the cause::

    VillageMeshError
    ├── ConfigError (ValueError)            a value given to villagemesh is unusable
    │   └── ChildSpecError                  a supervisor child spec is invalid
    ├── ProtocolError                       bytes broke a wire protocol's rules (abstract)
    │   ├── LocalProtocolError              ... and we were about to break them
    │   └── RemoteProtocolError             ... and the peer broke them
    ├── CodecError                          a bus message cannot be encoded or decoded
    ├── BusError                            the in-node message bus refused a message
    │   ├── NoSuchActor (LookupError)       nobody is registered under that name
    │   ├── MailboxFull                     the bounded mailbox is full
    │   ├── AskTimeout (TimeoutError)       no reply within the ask's timeout
    │   └── ActorCrashed                    the actor crashed while handling the ask
    ├── SupervisionError                    a supervisor could not keep its children up
    │   ├── RestartIntensityExceeded        too many restarts within the period
    │   └── NodeDown                        the node is not up (child, exc_type, detail: the cause)
    │       ├── NodeStartFailed             start(): the tree did not come up (the first crash)
    │       └── NodeFailed                  the root gave up after start (the last crash)
    ├── TransportError                      a transport could not move bytes
    │   ├── ConnectError                    ... it could not reach the peer
    │   └── TransportTimeout (TimeoutError) ... the peer was too slow
    ├── StorageError                        a persistent store (SQLite) failed, or the data dir
    │                                       is inconsistent (a store empty, missing, replaced, rolled back)
    ├── IdentityError                       the node's key is missing or unreadable while its stores have history
    ├── LabError                            the network-namespace lab could not build or drive a host (villagemesh.lab)
    ├── OutboxFull                          the send window to a peer (or in all) is full
    ├── RequestTimeout (TimeoutError)       no reply to a request within its timeout (peer, message id)
    ├── TransferError                       a large transfer did not end verified (transfer id, peer)
    │   ├── TransferRefused                 ... the receiver refused it before any byte was written (reason)
    │   └── DigestMismatch                  ... the bytes received do not hash to the digest offered
    └── DeliveryFailed                      a message was given up on (attempts, last_error)
        ├── Unhandled                       ... it reached the peer, which has no handler for its kind
        ├── RemoteError                     ... the peer's handler raised (exc_type, exc_message)
        └── Unconfirmed                     ... the peer acked it but reported no outcome in time

Every class has a one-line docstring saying what happened, and every instance
names the offending value in its message.
"""

from __future__ import annotations

__all__ = [
    "ActorCrashed",
    "AskTimeout",
    "BusError",
    "ChildSpecError",
    "CodecError",
    "ConfigError",
    "ConnectError",
    "DeliveryFailed",
    "DigestMismatch",
    "IdentityError",
    "LabError",
    "LocalProtocolError",
    "MailboxFull",
    "NoSuchActor",
    "NodeDown",
    "NodeFailed",
    "NodeStartFailed",
    "OutboxFull",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "RequestTimeout",
    "RestartIntensityExceeded",
    "StorageError",
    "SupervisionError",
    "TransferError",
    "TransferRefused",
    "TransportError",
    "TransportTimeout",
    "Unconfirmed",
    "Unhandled",
    "VillageMeshError",
]


class VillageMeshError(Exception):
    """Base of every error villagemesh raises on purpose."""


class ConfigError(VillageMeshError, ValueError):
    """A value given to villagemesh (an argument, a config file entry) is unusable."""


class ChildSpecError(ConfigError):
    """A supervisor child spec is invalid; raised before anything starts."""


class ProtocolError(VillageMeshError):
    """Bytes broke the rules of a wire protocol.

    Abstract: raise :class:`LocalProtocolError` or :class:`RemoteProtocolError`,
    which say who broke the rules (as h11 does).
    """

    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise LocalProtocolError or RemoteProtocolError")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (our bug or our caller's)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: garbage, oversize, bad MAC, replay."""


class CodecError(VillageMeshError):
    """A bus message cannot be encoded or decoded (unknown type, wrong field types)."""


class BusError(VillageMeshError):
    """The in-node message bus refused or lost track of a message."""


class NoSuchActor(BusError, LookupError):
    """No actor is registered under the name a message was addressed to."""


class MailboxFull(BusError):
    """The receiver's bounded mailbox stayed full for the whole send timeout."""


class AskTimeout(BusError, TimeoutError):
    """A request got no reply within its timeout."""


class ActorCrashed(BusError):
    """The actor crashed while handling a request; it is being restarted.

    ``exc_type`` and ``detail`` describe the exception that crashed it.
    """

    def __init__(self, actor: str, exc_type: str, detail: str) -> None:
        super().__init__(f"actor {actor!r} crashed handling the request: {exc_type}: {detail}")
        self.actor = actor
        self.exc_type = exc_type
        self.detail = detail


class SupervisionError(VillageMeshError):
    """A supervisor could not keep its children running."""


class RestartIntensityExceeded(SupervisionError):
    """More restarts than the intensity allows happened within the period."""

    def __init__(self, supervisor: str, child: str, intensity: int, period: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: child {child!r} needed more than {intensity} restart(s) within {period} s"
        )
        self.supervisor = supervisor
        self.child = child
        self.intensity = intensity
        self.period = period


class NodeDown(SupervisionError):
    """The node is not up (base of :class:`NodeStartFailed` and :class:`NodeFailed`).

    ``child`` names the child whose crash is the cause (None when none crashed),
    ``exc_type`` and ``detail`` describe that crash (or, without one, what happened).
    """

    _what = "is down"

    def __init__(self, node: str, child: str | None, exc_type: str | None, detail: str) -> None:
        cause = f"child {child!r} crashed: {exc_type}: {detail}" if child is not None else detail
        super().__init__(self._what.format(node=node, cause=cause))
        self.node = node
        self.child = child
        self.exc_type = exc_type
        self.detail = detail


class NodeStartFailed(NodeDown):
    """``Node.start()`` gave up: a child crashed before the tree was up (the first crash is the
    cause, not the escalation it led to), or the tree was not up in time."""

    _what = "node {node!r} did not start: {cause}"


class NodeFailed(NodeDown):
    """The node's root supervisor gave up after start: every later call raises this at once
    (the cause: the last crash that led to it)."""

    _what = "node {node!r} has failed ({cause}); stop it and start it again"


class TransportError(VillageMeshError):
    """A transport could not move bytes to or from a peer."""


class ConnectError(TransportError):
    """A transport could not reach the peer at all (safe to retry elsewhere)."""


class TransportTimeout(TransportError, TimeoutError):
    """A peer did not answer within the transport's timeout."""


class StorageError(VillageMeshError):
    """A persistent store (the registry's or the outbox's SQLite file) failed."""


class IdentityError(VillageMeshError):
    """The node's key file is missing or unreadable while its stores have history (a new
    identity would orphan them); start with ``new_identity=True`` to make one on purpose."""


class LabError(VillageMeshError):
    """The network-namespace lab (:mod:`villagemesh.lab`) could not build, change or drive a host:
    a failed ``ip`` command (its argv and stderr), a host process that died or did not answer."""


class DeliveryFailed(VillageMeshError):
    """A message was given up on: its TTL expired or every attempt failed.

    ``attempts`` is how many sends were tried, ``last_error`` what the last one said.
    """

    def __init__(self, message_id: str, attempts: int, last_error: str) -> None:
        super().__init__(f"message {message_id} not delivered after {attempts} attempt(s): {last_error}")
        self.message_id = message_id
        self.attempts = attempts
        self.last_error = last_error


class Unhandled(DeliveryFailed):
    """The message reached the peer, whose node has no handler for its kind (nothing ran)."""

    def __init__(self, message_id: str, attempts: int, kind: str) -> None:
        super().__init__(message_id, attempts, f"the peer has no handler for kind {kind!r}")
        self.kind = kind


class RemoteError(DeliveryFailed):
    """The peer's handler raised: ``exc_type`` and ``exc_message`` are its exception's (no traceback)."""

    def __init__(self, message_id: str, attempts: int, exc_type: str, exc_message: str) -> None:
        super().__init__(message_id, attempts, f"the peer's handler raised {exc_type}: {exc_message}")
        self.exc_type = exc_type
        self.exc_message = exc_message


class Unconfirmed(DeliveryFailed):
    """The peer acknowledged the message but no outcome report arrived within the bound."""


class OutboxFull(VillageMeshError):
    """The send window is full (``limit`` names which bound) and stayed full for ``timeout`` seconds."""

    def __init__(self, peer_id: str, limit: str, timeout: float) -> None:
        super().__init__(f"outbox full for {peer_id}: {limit} (waited {timeout} s for room)")
        self.peer_id = peer_id
        self.limit = limit
        self.timeout = timeout


class RequestTimeout(VillageMeshError, TimeoutError):
    """No reply to request ``message_id`` from ``peer_id`` within ``timeout`` seconds."""

    def __init__(self, peer_id: str, message_id: str, timeout: float) -> None:
        super().__init__(f"no reply from {peer_id} to request {message_id} within {timeout} s")
        self.peer_id = peer_id
        self.message_id = message_id
        self.timeout = timeout


class TransferError(VillageMeshError):
    """A large transfer (``transfer_id``, with ``peer_id``) did not end verified; ``reason`` says why."""

    def __init__(self, transfer_id: str, peer_id: str, reason: str, detail: str = "") -> None:
        text = f"transfer {transfer_id} with {peer_id} failed: {reason}"
        super().__init__(f"{text} ({detail})" if detail else text)
        self.transfer_id = transfer_id
        self.peer_id = peer_id
        self.reason = reason
        self.detail = detail


class TransferRefused(TransferError):
    """The receiver refused the transfer before any byte was written (``reason``: too_large,
    kind_not_allowed, no_space, invalid)."""


class DigestMismatch(TransferError):
    """The received bytes do not hash to the digest the sender offered: the partial file was deleted."""
