"""The channel between worker processes and their parent (`grpc.workers` > 1): framing only,
no I/O (extproc/workers/ owns the sockets).

A worker serves ext_proc streams; the parent owns storage, metrics and the admin API. Events and
counter snapshots flow up, flush barriers both ways. A frame is a kind byte, a 4-byte big-endian
length and the payload. The channel is a local socketpair, so a bad frame is a bug, not input:
it raises RelayError and the reader side closes the channel.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

# worker -> parent
EVENT = 1  # a serialized UsageEvent
STATS = 2  # a JSON snapshot of the worker's SidecarStats (extproc/stats.py)
READY = 3  # JSON {"pid", "port"}: the worker listens
FLUSHED = 4  # 8-byte token: everything the worker emitted before FLUSH was sent ahead of this
# parent -> worker
FLUSH = 5  # 8-byte token
CONFIG = 6  # JSON: the worker's settings (over the channel, not argv or environment: DSNs hold passwords)

KINDS = frozenset((EVENT, STATS, READY, FLUSHED, FLUSH, CONFIG))
MAX_FRAME = 64 << 20
_HEADER = struct.Struct(">BL")
_TOKEN = struct.Struct(">Q")


class RelayError(Exception):
    pass


def frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def token_frame(kind: int, token: int) -> bytes:
    return frame(kind, _TOKEN.pack(token))


def token(payload: bytes) -> int:
    if len(payload) != _TOKEN.size:
        raise RelayError(f"flush token of {len(payload)} bytes")
    return _TOKEN.unpack(payload)[0]


class FrameReader:
    """Feed bytes as they arrive, iterate complete frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= _HEADER.size:
                kind, length = _HEADER.unpack_from(buf, pos)
                if kind not in KINDS:
                    raise RelayError(f"unknown frame kind {kind}")
                if length > MAX_FRAME:
                    raise RelayError(f"frame of {length} bytes exceeds {MAX_FRAME}")
                end = pos + _HEADER.size + length
                if end > len(buf):
                    break
                payload = bytes(buf[pos + _HEADER.size:end])
                pos = end
                yield kind, payload
        finally:
            del buf[:pos]

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame: non-zero at end of channel means a cut frame."""
        return len(self._buf)
