"""libp2p protocols: each is a pure codec, a sans-IO machine and a thin trio handler."""
