"""Protocol-sniffing acceptor actor: one TCP port, every protocol."""
