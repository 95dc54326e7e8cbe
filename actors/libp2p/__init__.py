"""libp2p transport actor: a real libp2p peer (multistream, Noise, yamux, identify, ping) on the node's port."""
