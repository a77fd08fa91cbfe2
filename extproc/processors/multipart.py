"""Just enough of multipart/form-data (RFC 7578) to read an audio request's small text fields
and add one: the boundary is the body's first line (the content-type header is not needed),
file parts are skipped without being decoded."""

from __future__ import annotations

import re

from extproc.processors.base import RequestError

_NAME = re.compile(rb'\bname="([^"]*)"', re.I)
MAX_FIELD = 4096  # longer text fields (a long decoder prompt) are cut for metering only


def boundary_of(body: bytes) -> bytes:
    first, _, _ = body.partition(b"\r\n")
    if not first.startswith(b"--") or len(first) < 3 or len(first) > 72:
        raise RequestError("malformed_request_multipart", "request body is not multipart/form-data")
    return first[2:]


def form_fields(body: bytes) -> dict[str, str]:
    """Text fields by name (the first of a repeated name); parts with a filename are skipped."""
    delimiter = b"\r\n--" + boundary_of(body)
    fields: dict[str, str] = {}
    pos = len(delimiter) - 2
    while True:
        if body[pos:pos + 2] == b"--":
            return fields  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", pos)
        end = _delimiter_at(body, delimiter, head_end + 4) if head_end >= 0 else -1
        if head_end < 0 or end < 0:
            raise RequestError("malformed_request_multipart", "multipart body is cut short or has a bad part")
        head = body[pos:head_end]
        name = _NAME.search(head)
        if name is not None and b"filename=" not in head.lower():
            key = name.group(1).decode("utf-8", "replace")
            if key not in fields:
                fields[key] = body[head_end + 4:min(end, head_end + 4 + MAX_FIELD)].decode("utf-8", "replace")
        pos = end + len(delimiter)


def _delimiter_at(body: bytes, delimiter: bytes, start: int) -> int:
    """The next delimiter line: the boundary followed by CRLF (another part) or "--" (the end),
    not merely the boundary's bytes inside a part."""
    while (end := body.find(delimiter, start)) >= 0:
        if body[end + len(delimiter):end + len(delimiter) + 2] in (b"\r\n", b"--"):
            return end
        start = end + 1
    return -1


def add_field(body: bytes, name: str, value: str) -> bytes:
    """The body with one more text field, before the closing delimiter."""
    boundary = boundary_of(body)
    closing = body.rfind(b"\r\n--" + boundary + b"--")
    if closing < 0:
        raise RequestError("malformed_request_multipart", "multipart body has no closing delimiter")
    part = (b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
            + value.encode())
    return body[:closing] + part + body[closing:]
