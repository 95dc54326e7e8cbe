"""LAN discovery actor: signed UDP multicast beacons."""
