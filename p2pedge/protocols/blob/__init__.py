"""``/p2pedge/blob/1.0.0``: peers serve verified chunks of content-addressed blobs."""
