"""`extproc keys create|list|revoke`: edits of the policy file's key list. The file is checked as
a whole before and after, and replaced atomically (a watching sidecar never reads half a file).
Rewriting keeps the data, not YAML comments."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import yaml

from extproc.governance.policy import PolicyError, hash_key, key_id, parse_policy

TOKEN_PREFIX = "sk-extproc-"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    text = path.read_text()
    parse_policy(text, str(path))  # refuse to edit a file the sidecar would refuse
    return yaml.safe_load(text) or {}


def _write(path: Path, data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    parse_policy(text, str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_key(path: str | Path, *, team: str, feature: str = "", user: str = "", env: str = "",
               name: str = "") -> tuple[str, dict[str, Any]]:
    """Returns the new token (shown once, stored nowhere) and its entry."""
    p = Path(path)
    data = _read(p)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"sha256": hash_key(token)}
    if name:
        entry["name"] = name
    entry["team"] = team
    for label, value in (("feature", feature), ("user", user), ("env", env)):
        if value:
            entry[label] = value
    keys = data.get("keys") or []
    keys.append(entry)
    data["keys"] = keys
    _write(p, data)
    return token, entry


def list_keys(path: str | Path) -> list[dict[str, Any]]:
    policy = parse_policy(Path(path).read_text(), str(path))
    return [{"id": key_id(k.sha256), "name": k.name, **k.labels, "line": k.line} for k in policy.keys.values()]


def revoke_key(path: str | Path, ref: str) -> dict[str, Any]:
    """`ref`: a key's name, its id (the first 12 hex of its hash, or more), or the token itself."""
    p = Path(path)
    data = _read(p)
    keys = data.get("keys") or []
    digest = hash_key(ref)
    ref_l = ref.lower()
    hits: list[dict[str, Any]] = [k for k in keys if k.get("name") == ref or k["sha256"] == digest
            or (len(ref_l) >= 8 and str(k["sha256"]).lower().startswith(ref_l))]
    if not hits:
        raise PolicyError(f"{p}: no key matches {ref[:16]!r} (by name, id or token)")
    if len(hits) > 1:
        raise PolicyError(f"{p}: {len(hits)} keys match {ref[:16]!r}; give more of the id")
    keys.remove(hits[0])
    data["keys"] = keys
    _write(p, data)
    return hits[0]
