"""The client's side of verified computation: generation whose tokens come out only once
a check has covered them, and what happens when one finds a hop computing wrong (see
``verify.py`` for the checks themselves)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import ShardFailed
from p2pedge.protocols.pipeline.chain import ClientConfig, History, HopState, rollback
from p2pedge.protocols.pipeline.sampling import Sampler
from p2pedge.protocols.pipeline.verify import Audits, Mismatch


class CheckedChain:
    """Checked generation for :class:`~client.ShardedSession` (which provides the rest)."""

    hops: list[HopState]
    boundaries: list[History]
    config: ClientConfig
    audits: Audits | None
    detections: int
    push_ok: bool
    ring_ok: bool
    _bans: dict[str, tuple[float, int]]
    _distrusted: set[str]

    def banned(self) -> set[str]:
        raise NotImplementedError

    def _tokens(
        self, logits: npt.NDArray[np.float32], n: int, eos_id: int | None, sampler: Sampler
    ) -> AsyncGenerator[int, None]:
        raise NotImplementedError

    async def _settle(self, target: int) -> npt.NDArray[np.float32]:
        raise NotImplementedError

    async def _replace(self, index: int, avoid: str | None = None) -> bool:
        raise NotImplementedError

    async def _checked(
        self, logits: npt.NDArray[np.float32], n: int, eos_id: int | None, sampler: Sampler
    ) -> AsyncGenerator[int, None]:
        """:meth:`_tokens`, each held back until a check (at random tokens, and at the
        last) has recomputed every position it depends on. A mismatch bans the hop that
        computed wrong, and generation goes on from the position it got wrong, on an
        honest replica, with the tokens before it kept."""
        audits = self.audits
        assert audits is not None
        first = self.boundaries[0].length  # where the first picked token goes
        kept: list[int] = []  # picked tokens, by position from `first`
        delivered = verified = 0
        while True:
            mismatch: Mismatch | None = None
            tokens = self._tokens(logits, n - len(kept), eos_id, sampler)
            async with aclosing(tokens):
                async for token in tokens:
                    kept.append(token)
                    due = audits.due()  # drawn for every token: rings stop at the next one
                    first_one = len(kept) == 1 and audits.policy.first
                    if not (due or first_one or len(kept) == n or token == eos_id):
                        continue
                    at = first + len(kept) - 1
                    mismatch = await audits.check(
                        self.hops,
                        self.boundaries,
                        at,
                        token=token,
                        sampler=sampler,
                        sampled_from=first,
                        banned=self.banned(),
                    )
                    if mismatch is not None:
                        break
                    verified = at
                    for held in kept[delivered:]:
                        yield held
                    delivered = len(kept)
            if mismatch is None:
                return
            redo = await self._caught(mismatch, first, verified)
            kept = kept[: redo - first]
            logits = await self._settle(redo)

    async def _caught(self, mismatch: Mismatch, first: int, verified: int) -> int:
        """A hop caught computing wrong: off this session's routes for good (and banned
        as long as bans go), everything computed from its outputs forgotten, an honest
        replica in its place. Returns the position to feed up to again."""
        k = mismatch.hop
        p = max(mismatch.position, verified)  # what a check passed stays (an auditor swap)
        peer = self.hops[k].conn.peer
        self.detections += 1
        if self.detections > self.config.max_recoveries:
            raise ShardFailed(f"gave up after catching {self.detections - 1} servers")
        self._distrusted.add(peer)
        _, strikes = self._bans.get(peer, (0.0, 0))
        self._bans[peer] = (trio.current_time() + self.config.max_ban_seconds, strikes + 1)
        redo = max(p + 1, first)  # the prompt stays; picked tokens up to p stay
        rollback(self.hops, self.boundaries, p, redo)
        if self.audits is not None:
            await self.audits.reset()
        await self._replace(k)
        # pushed outputs and ring steps still in flight are for positions about to be
        # redone, some computed from the bad values: from here on, replies only
        self.push_ok = self.ring_ok = False
        return redo
