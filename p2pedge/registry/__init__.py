"""The model registry: signed manifests and content-addressed blobs over HTTP (no GPU)."""
