"""libp2p's wire protocols, sans-I/O: uvarints, multistream-select, peer ids and multiaddrs.

The ground the LibP2P transport will stand on (the actor, its dialing and listening,
Kademlia's lookups and the interop tests come next): :mod:`.varint`, :mod:`.multistream`,
:mod:`.peerid`, :mod:`.noise` (with :mod:`.protobuf`), :mod:`.yamux`, :mod:`.identify`
(and ping), :mod:`.kad`.
"""
