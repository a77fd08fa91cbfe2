"""Versioned schema migrations: extproc/sql/migrations/NNNN_name.sql, applied in order, once.

Applied versions are recorded in schema_migrations. Every statement is written to be
re-runnable (IF NOT EXISTS), so a migration interrupted half-way is simply applied again.
Statements are separated by a ';' at the end of a line. With storage.cluster set, the
ON CLUSTER / Replicated variants in extproc/sql/cluster/ are applied instead.

Retention (storage.ttl_days / rollup_ttl_days) is configuration, not a migration: after the
migrations, the tables' TTL is compared with the settings and ALTERed only when it differs.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.config import Settings

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        parts = (_strip_comments(p) for p in _STATEMENT_END.split(self.sql))
        return [p for p in parts if p]


def _strip_comments(sql: str) -> str:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip()


def load_migrations(cluster: bool = False) -> list[Migration]:
    directory = SQL_DIR / ("cluster" if cluster else "migrations")
    out = []
    for path in sorted(directory.glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise ValueError(f"migration file name must be NNNN_name.sql: {path}")
        out.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return out


def _quote_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a valid ClickHouse identifier: {name!r}")
    return f"`{name}`"


def _render(sql: str, cluster: str) -> str:
    # the files use the {cluster} macro; a configured name works without server macros too
    return sql.replace("'{cluster}'", _quote_ident(cluster)) if cluster else sql


def ensure_database(client: Any, database: str) -> None:
    exists = client.command(
        "SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": database}
    )
    if not int(exists):
        client.command(f"CREATE DATABASE IF NOT EXISTS {_quote_ident(database)}")
    client.database = database


def migrate(client: Any, settings: Settings) -> list[str]:
    """Apply pending migrations and the configured TTLs. Returns what was applied."""
    storage = settings.storage
    cluster = storage.cluster
    ensure_database(client, storage.database)
    migrations = load_migrations(cluster=bool(cluster))
    bootstrap, rest = migrations[0], migrations[1:]
    for statement in bootstrap.statements():
        client.command(_render(statement, cluster))
    rows = client.query("SELECT DISTINCT version, checksum FROM schema_migrations").result_rows
    applied = {int(v): c for v, c in rows}
    done: list[str] = []
    for m in rest:
        if m.version in applied:
            if applied[m.version] != m.checksum:
                log.warning("migration %04d_%s changed after it was applied; not re-applied",
                            m.version, m.name)
            continue
        log.info("applying migration %04d_%s", m.version, m.name)
        for statement in m.statements():
            client.command(_render(statement, cluster))
        client.command(
            "INSERT INTO schema_migrations (version, name, checksum) "
            "VALUES ({v:UInt32}, {n:String}, {c:String})",
            parameters={"v": m.version, "n": m.name, "c": m.checksum},
        )
        done.append(f"{m.version:04d}_{m.name}")
    done += apply_ttl(client, settings)
    return done


_TTL_COLUMNS = {"usage_events": "start_time", "usage_hourly": "hour"}


def apply_ttl(client: Any, settings: Settings) -> list[str]:
    storage = settings.storage
    on_cluster = f" ON CLUSTER {_quote_ident(storage.cluster)}" if storage.cluster else ""
    wanted = {"usage_events": storage.ttl_days, "usage_hourly": storage.rollup_ttl_days}
    changed = []
    for table, days in wanted.items():
        engine = client.command(
            "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": storage.database, "t": table},
        )
        engine = engine if isinstance(engine, str) else " ".join(map(str, engine))
        expr = f"toDateTime({_TTL_COLUMNS[table]}) + toIntervalDay({int(days)})"
        has_ttl = " TTL " in f" {engine} "
        if days > 0 and f"TTL {expr}" not in engine:
            client.command(f"ALTER TABLE {table}{on_cluster} MODIFY TTL {expr}")
            changed.append(f"ttl {table} {days}d")
        elif days <= 0 and has_ttl:
            client.command(f"ALTER TABLE {table}{on_cluster} REMOVE TTL")
            changed.append(f"ttl {table} removed")
    for item in changed:
        log.info("retention: %s", item)
    return changed
