"""One clickhouse-connect client for both deployments: embedded chDB or a ClickHouse server.

DSNs:
  chdb:///abs/path      embedded engine, data in /abs/path
  chdb:///./rel/path    embedded engine, path relative to the working directory (the default)
  chdb://memory         embedded engine, in memory (tests, demos)
  http(s)://user:pass@host:8123/db?setting=value   ClickHouse server; TLS from StorageSettings

chDB hosts one data directory per process, and a second process cannot open a directory in
use: open one client per process and share it, from one thread (see store.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from extproc.config import StorageSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    kind: str  # "chdb" | "http"
    path: str | None = None  # chdb: data directory, None = in memory
    database: str = ""
    redacted: str = ""  # the DSN without its password, for logs


def parse_dsn(dsn: str, default_database: str) -> Target:
    if dsn.startswith("chdb:"):
        rest = dsn[len("chdb:"):]
        if rest.startswith("//"):
            rest = rest[2:]
        if rest in ("", "memory", ":memory:", "/:memory:"):
            return Target("chdb", None, default_database, "chdb://memory")
        # chdb:///abs -> "/abs"; chdb:///./rel -> "./rel"; chdb://rel -> "rel"
        path = rest[1:] if rest.startswith(("/./", "/../")) else rest
        path = os.path.abspath(path)
        return Target("chdb", path, default_database, f"chdb://{path}")
    parts = urlsplit(dsn)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"storage.dsn: unsupported scheme {parts.scheme!r}")
    database = unquote(parts.path.strip("/")) or default_database
    netloc = parts.hostname or "localhost"
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{unquote(parts.username)}:***@{netloc}"
    return Target("http", None, database, f"{parts.scheme}://{netloc}/{database}")


def build_client(settings: StorageSettings) -> tuple[Client, Target]:
    """Connect without selecting the database: it may not exist yet (migrate creates it)."""
    target = parse_dsn(settings.dsn, settings.database)
    if target.kind == "chdb":
        kwargs: dict[str, Any] = {"interface": "chdb"}
        if target.path:
            Path(target.path).mkdir(parents=True, exist_ok=True)
            kwargs["path"] = target.path
        client = clickhouse_connect.get_client(**kwargs)
    else:
        parts = urlsplit(settings.dsn)
        secure = parts.scheme == "https"
        kwargs = {
            "host": parts.hostname or "localhost",
            "port": parts.port or (8443 if secure else 8123),
            "username": unquote(parts.username or "default"),
            "password": unquote(parts.password or ""),
            "interface": parts.scheme,
            "secure": secure,
            # clickhouse-connect takes whole seconds
            "connect_timeout": max(1, round(settings.connect_timeout_ms / 1000)),
            "send_receive_timeout": max(1, round(settings.query_timeout_ms / 1000)),
            # our batcher owns retries (deduplicated); a hidden client retry would only add delay
            "query_retries": 0,
            "settings": dict(parse_qsl(parts.query)),
        }
        if secure:
            kwargs["verify"] = settings.verify
            for key in ("ca_cert", "client_cert", "client_cert_key"):
                if getattr(settings, key):
                    kwargs[key] = getattr(settings, key)
        client = clickhouse_connect.get_client(**kwargs)
    log.info("clickhouse client connected: %s", target.redacted)
    return client, target


def make_client(settings: StorageSettings) -> Client:
    """build_client without the parsed target (for `extproc migrate`)."""
    return build_client(settings)[0]
