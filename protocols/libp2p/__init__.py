"""libp2p's wire protocols, sans-I/O: uvarints, multistream-select, peer ids and multiaddrs.

The ground the LibP2P transport will stand on (Noise with the libp2p payload,
identify, ping and Kademlia come next): :mod:`.varint`, :mod:`.multistream`,
:mod:`.peerid`, :mod:`.yamux`.
"""
