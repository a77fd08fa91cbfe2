"""A minimal fixed-response HTTP/1.1 upstream on asyncio.Protocol: every request (keep-alive,
any path) gets the same pre-built response. Stands in for vLLM where the simulator would be the
bottleneck.

    python -m bench.upstream --port 8000 --body response.json [--content-type application/json]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any


def json_response(body: bytes, content_type: str = "application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (content_type.encode(), len(body), body))


def _content_length(head: bytes) -> int:
    i = head.find(b"content-length:")
    if i < 0:
        return 0
    end = head.find(b"\r\n", i)
    return int(head[i + 15:end if end > 0 else None])


class Upstream(asyncio.Protocol):
    """Answers each complete request (headers + content-length body) with `response`."""

    response = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = _content_length(self.buf[:end].lower())
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(self.response)


async def serve(port: int, response: bytes) -> None:
    Upstream.response = response
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--content-type", default="application/json")
    args = p.parse_args()
    asyncio.run(serve(args.port, json_response(args.body.read_bytes(), args.content_type)))


if __name__ == "__main__":
    main()
