"""Trio glue for ``/p2pedge/infer/1.0.0``: a server handler and a caller.

Register ``InferServer(backend).handle`` with ``node.set_stream_handler(PROTOCOL_ID, ...)``
and call :func:`request_completion` on a stream from ``node.open_stream``. The backend
does the actual work (the orchestrator wires it to local inference).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2pedge.errors import (
    ModelNotCached,
    P2PEdgeError,
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
)

__all__ = ["PROTOCOL_ID", "InferBackend", "InferServer", "request_completion"]

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
    """Serves remote callers with bounded concurrency and a bounded queue."""

    def __init__(
        self,
        backend: InferBackend,
        *,
        limits: InferLimits | None = None,
        max_active: int = 1,
        max_queue: int = 8,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.backend = backend
        self.limits = limits or InferLimits()
        self.admission = Admission(max_active, max_queue)
        self._running = trio.Semaphore(max_active)
        self.request_timeout_s = request_timeout_s
        self.served = 0

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        """One exchange; errors from the peer end it, our own failures are reported."""
        machine = InferServerMachine(self.limits)
        try:
            first = await stream.receive(timeout=self.request_timeout_s)
            outcome = machine.receive_request(first)
            if isinstance(outcome, dict):
                await stream.send(outcome)
                return
            await self._serve(stream, machine, outcome)
        except RemoteProtocolError as exc:
            await _send_quietly(stream, machine, "bad_request", str(exc))
        except PeerUnavailable:
            return
        finally:
            await _close_quietly(stream)

    async def _serve(
        self, stream: FramedStream, machine: InferServerMachine, request: InferRequest
    ) -> None:
        if not await self.backend.serves(request.model):
            await stream.send(machine.reject("unknown_model", f"{request.model} is not served"))
            return
        position = self.admission.admit()
        if position is None:
            await stream.send(machine.reject("busy", "queue full, try another peer"))
            return
        try:
            await stream.send(machine.accept(position))
            async with self._running:

                async def on_piece(text: str) -> None:
                    for frame in machine.piece(text):
                        await stream.send(frame)

                try:
                    result = await self._run_watched(stream, request, on_piece)
                except PeerUnavailable:
                    raise
                except ModelNotCached as exc:
                    await stream.send(machine.fail("unknown_model", str(exc)))
                    return
                except (P2PEdgeError, ValueError, RuntimeError) as exc:
                    await stream.send(machine.fail("internal", f"{type(exc).__name__}: {exc}"))
                    return
                await stream.send(machine.done(result))
                self.served += 1
        finally:
            self.admission.release()

    async def _run_watched(
        self, stream: FramedStream, request: InferRequest, on_piece: OnPiece
    ) -> InferResult:
        """Run the backend, cancelling it if the caller hangs up or sends ``cancel``."""
        result: InferResult | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                with contextlib.suppress(PeerUnavailable, RemoteProtocolError):
                    await stream.receive()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            result = await self.backend.run(request, on_piece)
            nursery.cancel_scope.cancel()
        if result is None:
            raise PeerUnavailable("caller cancelled or hung up")
        return result


async def _send_quietly(
    stream: FramedStream, machine: InferServerMachine, code: str, msg: str
) -> None:
    """Best effort: the peer already broke the protocol, so a dead stream is fine."""
    try:
        await stream.send(machine.fail(code, msg))
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
