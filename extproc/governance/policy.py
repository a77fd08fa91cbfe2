"""The policy file (public format): virtual keys, budgets, rate limits, require_key.

Parsed from YAML nodes rather than plain objects so every error names its line. Pure: reading the
file is the caller's business (`load_policy` is the one convenience that opens it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PERIODS = ("day", "week", "month")
# Scopes a budget or a rate limit can name; nested scopes combine them (team + feature).
SCOPE_FIELDS = ("team", "feature", "key", "user")
KEY_LABELS = ("team", "feature", "user", "env")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and line."""


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_id(sha256: str) -> str:
    """The name a key goes by in scopes, logs and reports: never the hash whole."""
    return sha256[:12]


@dataclass(frozen=True, slots=True)
class KeyEntry:
    sha256: str
    labels: dict[str, str]  # team, and feature / user / env when given
    name: str
    line: int

    @property
    def id(self) -> str:
        return self.name or key_id(self.sha256)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which requests a budget or limit covers: every named field must match."""

    team: str = ""
    feature: str = ""
    key: str = ""
    user: str = ""

    def matches(self, labels: Mapping[str, str], keys: tuple[str, ...]) -> bool:
        """`keys`: the names the request's key goes by (its name, its id); () without a key."""
        return ((not self.team or labels.get("team") == self.team)
                and (not self.feature or labels.get("feature") == self.feature)
                and (not self.user or labels.get("user") == self.user)
                and (not self.key or self.key in keys))

    # "team=search,feature=ranking": in ledger keys, reports and messages (set once, below)
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        name = ",".join(f"{f}={getattr(self, f)}" for f in SCOPE_FIELDS if getattr(self, f))
        object.__setattr__(self, "name", name)


@dataclass(frozen=True, slots=True)
class Budget:
    scope: Scope
    period: str
    limit_usd: float | None
    limit_tokens: int | None
    hard: bool
    webhook: str
    line: int

    @property
    def limit_micros(self) -> int | None:
        return None if self.limit_usd is None else round(self.limit_usd * 1_000_000)


@dataclass(frozen=True, slots=True)
class RateLimit:
    scope: Scope
    requests_per_minute: int | None
    tokens_per_minute: int | None
    line: int


@dataclass(frozen=True, slots=True)
class Policy:
    keys: dict[str, KeyEntry] = field(default_factory=dict)  # by sha256
    budgets: tuple[Budget, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    require_key: bool = False
    source: str = ""

    @property
    def has_hard_budgets(self) -> bool:
        return any(b.hard for b in self.budgets)

    def observe_conflicts(self) -> list[str]:
        """What this policy needs of the request path that observe mode cannot give (Envoy does
        not wait for the sidecar's answers there, so nothing can be refused or removed)."""
        out = []
        if self.has_hard_budgets:
            out.append("hard budgets (a 429 before the upstream is called)")
        if self.rate_limits:
            out.append("rate limits (a 429 before the upstream is called)")
        if self.require_key or self.keys:
            out.append("virtual keys (a 401 for unknown keys, and the key removed before vLLM)")
        return out


def _line(node: yaml.Node) -> int:
    line: int = node.start_mark.line  # yaml ships no types
    return line + 1


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node, msg: str) -> PolicyError:
        return PolicyError(f"{self.source}:{_line(node)}: {msg}")

    def mapping(self, node: yaml.Node, what: str) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.fail(k, f"{what}: keys must be plain names")
            if k.value in out:
                raise self.fail(k, f"{what}: {k.value!r} given twice")
            out[k.value] = v
        return out

    def seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return yaml.safe_load(yaml.serialize(node))

    def text(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
            raise self.fail(node, f"{what} must be a non-empty string")
        return str(value).strip()

    def number(self, node: yaml.Node, what: str, *, integer: bool) -> float | int:
        value: float | int = self.scalar(node, what)
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if not ok or isinstance(value, bool) or value < 0:
            kind = "a non-negative integer" if integer else "a non-negative number"
            raise self.fail(node, f"{what} must be {kind}, got {value!r}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.fail(node, f"{what} must be true or false, got {value!r}")
        return value

    def unknown(self, entry: dict[str, yaml.Node], allowed: tuple[str, ...], what: str) -> None:
        for name, node in entry.items():
            if name not in allowed:
                raise self.fail(node, f"{what}: unknown field {name!r} (known: {', '.join(allowed)})")

    def scope(self, entry: dict[str, yaml.Node], node: yaml.Node, what: str) -> Scope:
        values = {f: self.text(entry[f], f"{what}.{f}") for f in SCOPE_FIELDS if f in entry}
        if not values:
            raise self.fail(node, f"{what} must name a scope: one or more of {', '.join(SCOPE_FIELDS)}")
        return Scope(**values)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    r = _Reader(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        return Policy(source=source)
    top = r.mapping(root, "the policy file")
    r.unknown(top, ("keys", "budgets", "rate_limits", "require_key"), "policy")
    keys: dict[str, KeyEntry] = {}
    names: dict[str, int] = {}
    for node in r.seq(top["keys"], "keys") if "keys" in top else []:
        e = r.mapping(node, "a key")
        r.unknown(e, ("sha256", "name", *KEY_LABELS), "key")
        if "sha256" not in e:
            raise r.fail(node, "key: sha256 is required (the hex SHA-256 of the whole token)")
        digest = r.text(e["sha256"], "key.sha256").lower()
        if not _HEX64.fullmatch(digest):
            raise r.fail(e["sha256"], "key.sha256 must be 64 hex characters (a SHA-256, never the key itself)")
        if digest in keys:
            raise r.fail(e["sha256"], f"duplicate key hash (first on line {keys[digest].line})")
        if "team" not in e:
            raise r.fail(node, "key: team is required")
        labels = {f: r.text(e[f], f"key.{f}") for f in KEY_LABELS if f in e}
        name = r.text(e["name"], "key.name") if "name" in e else ""
        if name and name in names:
            raise r.fail(e["name"], f"duplicate key name {name!r} (first on line {names[name]})")
        if name:
            names[name] = _line(node)
        keys[digest] = KeyEntry(digest, labels, name, _line(node))
    budgets: list[Budget] = []
    for node in r.seq(top["budgets"], "budgets") if "budgets" in top else []:
        e = r.mapping(node, "a budget")
        r.unknown(e, (*SCOPE_FIELDS, "period", "limit_usd", "limit_tokens", "hard", "webhook"), "budget")
        scope = r.scope(e, node, "budget")
        period = r.text(e["period"], "budget.period") if "period" in e else "month"
        if period not in PERIODS:
            raise r.fail(e["period"], f"budget.period must be one of {', '.join(PERIODS)}, got {period!r}")
        usd = float(r.number(e["limit_usd"], "budget.limit_usd", integer=False)) if "limit_usd" in e else None
        tokens = int(r.number(e["limit_tokens"], "budget.limit_tokens", integer=True)) if "limit_tokens" in e else None
        if usd is None and tokens is None:
            raise r.fail(node, "budget needs limit_usd and/or limit_tokens")
        hard = r.boolean(e["hard"], "budget.hard") if "hard" in e else False
        hook = r.text(e["webhook"], "budget.webhook") if "webhook" in e else ""
        budgets.append(Budget(scope, period, usd, tokens, hard, hook, _line(node)))
    limits: list[RateLimit] = []
    for node in r.seq(top["rate_limits"], "rate_limits") if "rate_limits" in top else []:
        e = r.mapping(node, "a rate limit")
        r.unknown(e, (*SCOPE_FIELDS, "requests_per_minute", "tokens_per_minute"), "rate limit")
        scope = r.scope(e, node, "rate limit")
        rpm = int(r.number(e["requests_per_minute"], "requests_per_minute", integer=True)) \
            if "requests_per_minute" in e else None
        tpm = int(r.number(e["tokens_per_minute"], "tokens_per_minute", integer=True)) \
            if "tokens_per_minute" in e else None
        if rpm is None and tpm is None:
            raise r.fail(node, "rate limit needs requests_per_minute and/or tokens_per_minute")
        limits.append(RateLimit(scope, rpm, tpm, _line(node)))
    known = {k.id for k in keys.values()} | {key_id(k) for k in keys}
    scoped: tuple[Budget | RateLimit, ...] = (*budgets, *limits)
    for item in scoped:
        if item.scope.key and item.scope.key not in known:
            raise PolicyError(f"{source}:{item.line}: key {item.scope.key!r} names no key in this file "
                              "(use a key's name or the first 12 hex of its sha256)")
    require = r.boolean(top["require_key"], "require_key") if "require_key" in top else False
    return Policy(keys, tuple(budgets), tuple(limits), require, source)


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the policy file: {exc.strerror or exc}") from None
    return parse_policy(text, str(p))
