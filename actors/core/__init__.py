"""The actor kit: the ground floor every villagemesh actor stands on, and nothing else.

An actor folder (``villagemesh.actors.<name>``) imports this kit, ``villagemesh.protocols``,
``villagemesh.errors``, ``villagemesh.supervision.spec`` and other actors' ``messages``
modules, never another actor's private modules (``tests/test_layout.py`` checks it)::

    base        the actor base: mailbox turns, timers as messages, asks with timeouts, crash reports
    bus         the typed message bus over ZeroMQ inproc (one Context per node)
    codec       the msgpack codec of bus messages (registered frozen dataclasses; no pickle)
    transport   the transport contract: Transmit / Received / Discover / ConnectionHandedOff ...
    handoff     a sniffed connection handed from the acceptor's loop to its owner's loop
    loopthread  an asyncio loop in a supervised thread
    loopactor   the shell of every I/O actor: an actor that owns a loop thread
    logbudget   the first few repetitive warnings per key and window logged, the rest counted
    threadnames OS names for the kit's threads (what top -H, perf and py-spy show)
    storage     opening SQLite files the one right way, and translating their errors
    integrity   each store checked on open, the data dir's manifest, checkpoints that bound a lost log
    ledger      the messages file: outbox and inbox tables, and the Inbox two actors share
    secure      authenticated sessions (Noise XX + Ed25519 identities) for stream transports
"""
