"""Trio glue for ``/p2pedge/infer/1.0.0``: a server handler and a caller.

Register ``InferServer(backend).handle`` with ``node.set_stream_handler(PROTOCOL_ID, ...)``
and call :func:`request_completion` on a stream from ``node.open_stream``. The backend
does the actual work (the orchestrator wires it to local inference).

The server contains its failures: whatever a request does (a malformed field, a quota
refusal, a backend error, ExceptionGroups from its nurseries included), the caller gets
a typed ``error`` frame and the handler then raises the typed error for the node's
:func:`~p2pedge.protocols._stream.contain` to log with the peer's id; a request that is
well formed but unservable (unknown model, prompt over the context) just gets its answer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2pedge.errors import (
    Busy,
    FrameTooLarge,
    ModelNotCached,
    PeerTimeout,
    PeerUnavailable,
    ProtocolError,
    RemoteProtocolError,
)
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.infer.codec import PROTOCOL_ID, InferLimits, InferRequest, InferResult
from p2pedge.protocols.infer.machine import (
    Accepted,
    Admission,
    Completed,
    Failed,
    InferClient,
    InferServerMachine,
    Piece,
    ServerState,
)
from p2pedge.runtime.sampling import PromptTooLong

__all__ = ["PROTOCOL_ID", "InferBackend", "InferServer", "request_completion"]

log = logging.getLogger("p2pedge.protocols.infer")

OnPiece = Callable[[str], Awaitable[None]]
StreamHandler = Callable[[FramedStream, str], Awaitable[None]]
_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_ids)


class InferBackend(Protocol):
    """Runs a request locally, streaming pieces through ``on_piece``."""

    async def serves(self, model: str) -> bool: ...

    async def run(self, request: InferRequest, on_piece: OnPiece) -> InferResult: ...


class InferServer:
    """Serves remote callers within :class:`InferLimits`: bounded request size, queue
    slots per peer, per source address and in total, at most ``max_active`` running."""

    def __init__(self, backend: InferBackend, *, limits: InferLimits | None = None) -> None:
        self.backend = backend
        self.limits = limits or InferLimits()
        self.admission = Admission(self.limits)
        self._running = trio.Semaphore(self.limits.max_active)
        self.served = 0

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        """One exchange. The caller always gets a typed answer; a hostile or failed
        exchange then raises its typed error (see the module docstring)."""
        stream = stream.reframed(min(stream.max_frame, self.limits.max_request_bytes))
        machine = InferServerMachine(self.limits)
        try:
            first = await stream.receive(timeout=self.limits.request_timeout_s)
            outcome = machine.receive_request(first)
            if isinstance(outcome, dict):  # too large: a legitimate refusal
                await stream.send(outcome)
                return
            await self._serve(stream, peer_id, machine, outcome)
        except (ModelNotCached, ValueError) as exc:  # unservable, not hostile
            log.info("infer request from %s refused: %s", peer_id, exc)
            await _answer(stream, machine, exc)
        except Exception as exc:
            await _answer(stream, machine, exc)
            raise
        finally:
            await _close_quietly(stream)

    async def _serve(
        self, stream: FramedStream, peer: str, machine: InferServerMachine, request: InferRequest
    ) -> None:
        # The slot first: a flood is refused before it costs even a model lookup.
        grant, position = self.admission.admit(peer, stream.source)
        try:
            if not await self.backend.serves(request.model):
                raise ModelNotCached(request.model)
            await stream.send(machine.accept(position))
            async with self._running:

                async def on_piece(text: str) -> None:
                    for frame in machine.piece(text):
                        await stream.send(frame)

                result = await self._run_watched(stream, request, on_piece)
                await stream.send(machine.done(result))
                self.served += 1
        finally:
            self.admission.release(grant)

    async def _run_watched(
        self, stream: FramedStream, request: InferRequest, on_piece: OnPiece
    ) -> InferResult:
        """Run the backend, cancelling it if the caller hangs up or sends ``cancel``.

        The backend's failure is caught inside the nursery and raised after it, bare, so
        callers match it by type rather than inside an ExceptionGroup.
        """
        outcome: InferResult | Exception | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                with contextlib.suppress(PeerUnavailable, RemoteProtocolError):
                    await stream.receive()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                outcome = await self.backend.run(request, on_piece)
            except Exception as exc:  # re-raised below, outside the nursery's group
                outcome = exc
            nursery.cancel_scope.cancel()
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is None:
            raise PeerUnavailable("caller cancelled or hung up")
        return outcome


def _error_code(exc: Exception) -> str:
    """The wire code for why an exchange ended (``internal``: our side failed)."""
    if isinstance(exc, Busy):
        return "busy"
    if isinstance(exc, ModelNotCached):
        return "unknown_model"
    if isinstance(exc, OverflowError | PromptTooLong | FrameTooLarge):
        return "too_large"
    if isinstance(exc, RemoteProtocolError | ValueError):
        return "bad_request"
    if isinstance(exc, PeerTimeout):
        return "timeout"
    return "internal"


async def _answer(stream: FramedStream, machine: InferServerMachine, exc: Exception) -> None:
    """Tell the caller why its exchange ends, unless it is over or the stream is gone."""
    gone = isinstance(exc, PeerUnavailable) and not isinstance(exc, PeerTimeout)
    if gone or machine.state is ServerState.CLOSED:
        return
    code = _error_code(exc)
    message = str(exc) if code != "internal" else f"{type(exc).__name__}: {exc}"
    limit, scope = (exc.limit, exc.scope) if isinstance(exc, Busy) else ("", "")
    try:
        await stream.send(machine.fail(code, message, limit=limit, scope=scope))
    except (PeerUnavailable, ProtocolError):
        return


async def _close_quietly(stream: FramedStream) -> None:
    try:
        await stream.close()
    except PeerUnavailable:
        return


async def request_completion(
    stream: FramedStream,
    request: InferRequest,
    *,
    timeout_s: float = 60.0,
    limits: InferLimits | None = None,
    on_piece: OnPiece | None = None,
) -> InferResult:
    """Send ``request`` and wait for its completion, forwarding pieces to ``on_piece``.

    Raises the typed error the server sent (``Busy``, ``ModelNotCached``,
    ``InferRejected``, ``InferFailed``), ``PeerTimeout`` past ``timeout_s``,
    ``PeerUnavailable`` when the stream dies and ``RemoteProtocolError`` on garbage.
    """
    client = InferClient(request, limits=limits, timeout_s=timeout_s)
    # the longest frame an honest server sends is a ``done`` with the whole text
    stream = stream.reframed(min(stream.max_frame, 4 * client.limits.max_text_chars + 4096))
    try:
        await stream.send(client.start(trio.current_time()))
        while True:
            left = client.time_left(trio.current_time())
            if left <= 0:
                raise client.timed_out(trio.current_time()).error
            try:
                msg = await stream.receive(timeout=left)
            except PeerTimeout as exc:
                raise client.timed_out(trio.current_time()).error from exc
            event = client.receive(msg, trio.current_time())
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Completed):
                return event.result
            if isinstance(event, Piece) and on_piece is not None:
                await on_piece(event.text)
            assert isinstance(event, Accepted | Piece)
    finally:
        await _close_quietly(stream)
