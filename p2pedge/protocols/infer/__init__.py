"""``/p2pedge/infer/1.0.0``: run a model for a remote caller (codec, machine, handler)."""
