"""Layer-wise sharded inference: ``/p2pedge/pipeline/1.0.0`` (codec, machine, handler, client)."""
