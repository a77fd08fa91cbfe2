"""HTTP/2 frame constants and builders (RFC 9113), and the few HPACK literals we emit.

Our own header blocks never touch the HPACK dynamic table (literals without indexing, static
names), so they are constant bytes whatever the peer's table size: no encoder state to keep.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)

# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings identifiers
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1

# 24-bit length (as 8 + 16 bits), type, flags, stream id
FRAME_HEADER = struct.Struct(">BHBBL")
# a DATA frame header followed by the gRPC message prefix (compressed flag, length)
DATA_MESSAGE_HEADER = struct.Struct(">BHBBLBL")
U32 = struct.Struct(">L")
U32X2 = struct.Struct(">LL")
SETTING = struct.Struct(">HL")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in values.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, U32X2.pack(last_stream_id, code) + debug)


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


# --- HPACK output (RFC 7541): literals without indexing, no Huffman ---------------------------

# Dynamic table size update to 0: legal under any peer SETTINGS_HEADER_TABLE_SIZE, and it keeps
# the peer's decoder from expecting an update after it shrinks its table.
TABLE_SIZE_ZERO = b"\x20"


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name (RFC 7541 6.2.2)."""
    return b"\x00" + _int(len(name), 7, 0) + name + _int(len(value), 7, 0) + value


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """Literal without indexing, name from the static table."""
    return _int(index, 4, 0) + _int(len(value), 7, 0) + value


STATUS_200 = b"\x88"  # static table index 8
_CONTENT_TYPE = 31  # static table index of content-type


def status(code: int) -> bytes:
    return STATUS_200 if code == 200 else literal_indexed_name(8, str(code).encode())


GRPC_RESPONSE_HEADERS = STATUS_200 + literal_indexed_name(_CONTENT_TYPE, b"application/grpc")
GRPC_OK_TRAILERS = literal(b"grpc-status", b"0")
