"""``POST /v1/embeddings``: OpenAI's embeddings list from an embedder this node holds.

Vectors come as float lists or, with ``encoding_format: "base64"`` (what the ``openai``
client asks for and decodes itself), as base64 of little-endian float32.
"""

from __future__ import annotations

import base64
from typing import Any

from p2pedge.api.backend import ApiBackend, Embedded, NotAnEmbedder
from p2pedge.api.schema import EmbeddingRequest, bad, not_found
from p2pedge.runtime.sampling import PromptTooLong


async def embeddings(backend: ApiBackend, request: EmbeddingRequest) -> dict[str, Any]:
    """The response body; 404 for an unknown model, 400 for one that makes no vectors and
    for an input longer than the model takes. Other failures keep their project types."""
    target = await backend.target(request.model)
    if target is None:
        raise not_found(request.model)
    try:
        made = await backend.embed(target, request)
    except NotAnEmbedder as exc:
        raise bad(str(exc), "model", "model_not_embedding") from None
    except PromptTooLong as exc:
        raise bad(str(exc), "input", "context_length_exceeded") from None
    return _body(request, made)


def _body(request: EmbeddingRequest, made: Embedded) -> dict[str, Any]:
    rows = made.vectors.astype("<f4")
    data = []
    for i, row in enumerate(rows):
        vector: object
        if request.encoding_format == "base64":
            vector = base64.b64encode(row.tobytes()).decode("ascii")
        else:
            vector = row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": made.tokens, "total_tokens": made.tokens},
    }
