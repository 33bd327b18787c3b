"""p2pedge.runtime."""
