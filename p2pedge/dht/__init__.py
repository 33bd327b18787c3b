"""p2pedge.dht."""
