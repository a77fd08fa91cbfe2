"""`grpc.listen` parsed once for every listener that binds it (the h2 server, the worker pool)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListenAddress:
    path: str = ""  # a Unix socket
    host: str = ""  # without IPv6 brackets; "" = every interface
    port: int = 0


def parse_listen(value: str) -> ListenAddress:
    """host:port, [v6]:port or unix:/path (also unix:///path). ValueError for a bad port."""
    if value.startswith("unix:"):
        return ListenAddress(path=value[len("unix://"):] if value.startswith("unix://") else value[len("unix:"):])
    host, _, port = value.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"grpc.listen {value!r}: the port is not a number") from None
    return ListenAddress(host=host.strip("[]"), port=number)
