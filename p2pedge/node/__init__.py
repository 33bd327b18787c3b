"""p2pedge.node."""
