"""p2pedge.planning."""
