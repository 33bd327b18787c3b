"""Length-prefixed framing: a 4-byte big-endian length, then the payload.

The decoder is sans-IO (feed bytes, get whole frames) and refuses a length above its
limit as soon as the prefix arrives, so a peer cannot make us buffer a huge frame.
"""

from __future__ import annotations

import struct

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

PREFIX = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


def encode_frame(payload: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix ``payload`` with its length; refuses what the other side would refuse."""
    if len(payload) > max_frame:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds limit {max_frame}")
    return PREFIX.pack(len(payload)) + payload


class FrameDecoder:
    """Reassembles frames from arbitrary chunks of a byte stream.

    ``min_frame`` refuses, at the prefix, frames too short to be valid (a sealed frame
    needs room for its tag)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, min_frame: int = 0) -> None:
        if max_frame <= 0 or not 0 <= min_frame <= max_frame:
            raise LocalProtocolError("need 0 <= min_frame <= max_frame and max_frame > 0")
        self.max_frame = max_frame
        self.min_frame = min_frame
        self._buffer = bytearray()
        self._expected: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every frame now complete, in order."""
        if not self._buffer and self._expected is None and len(data) >= PREFIX.size:
            (length,) = PREFIX.unpack_from(data)
            if len(data) == PREFIX.size + length and self.min_frame <= length <= self.max_frame:
                return [data[PREFIX.size :]]  # the common case: exactly one whole frame
        self._buffer += data
        frames: list[bytes] = []
        while True:
            if self._expected is None:
                if len(self._buffer) < PREFIX.size:
                    return frames
                (length,) = PREFIX.unpack_from(self._buffer)
                if length > self.max_frame:
                    raise FrameTooLarge(
                        f"peer announced a {length}-byte frame (limit {self.max_frame})"
                    )
                if length < self.min_frame:
                    raise RemoteProtocolError(
                        f"peer announced a {length}-byte frame (at least {self.min_frame})"
                    )
                del self._buffer[: PREFIX.size]
                self._expected = length
            if len(self._buffer) < self._expected:
                return frames
            frames.append(bytes(self._buffer[: self._expected]))
            del self._buffer[: self._expected]
            self._expected = None
