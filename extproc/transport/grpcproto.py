"""The gRPC-over-HTTP/2 conventions we need: status codes, trailers, grpc-timeout."""

from __future__ import annotations

from extproc.transport import frames

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

# grpc-message is for humans: keep error trailers far below any peer frame or header list limit
_MAX_MESSAGE_BYTES = 1024
_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(message: str) -> bytes:
    """gRPC's grpc-message encoding: UTF-8, then %XX for bytes outside 0x20-0x7E and '%'."""
    raw = message.encode("utf-8", "replace")[:_MAX_MESSAGE_BYTES]
    if all(b in _UNRESERVED for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b for b in raw)


def trailers_block(code: int, message: str = "", extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    if code == OK and not message and not extra:
        return frames.GRPC_OK_TRAILERS
    block = frames.literal(b"grpc-status", str(code).encode())
    if message:
        block += frames.literal(b"grpc-message", percent_encode(message))
    for name, value in extra:
        block += frames.literal(name, value)
    return block


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout: at most 8 ASCII digits and a unit. None when malformed (ignored, like grpcio)."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit
