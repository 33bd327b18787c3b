"""The one finished-generation type, whether it ran here, on a peer or across shards."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Completion:
    """A finished generation. ``tok_per_s`` is the decode rate after the first token.

    ``provider`` says what ran it (an execution provider here, ``<peer>:<provider>`` on a
    peer, ``sharded`` across shard servers). ``token_ids`` are known for local and sharded
    runs (a peer sends only text); ``route`` (``<peer>:<blocks>`` per hop) and
    ``recoveries`` only for sharded runs.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tok_per_s: float
    finish_reason: str
    provider: str
    token_ids: tuple[int, ...] = ()
    route: tuple[str, ...] = ()
    recoveries: int = 0
