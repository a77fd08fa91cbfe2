"""Policy file watching: a changed file (a Kubernetes Secret is swapped by symlink) is parsed and
installed; a broken one keeps the last good policy, logged and counted, until it is fixed."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from extproc.governance.policy import Policy, PolicyError, load_policy

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a Secret's ..data swap changes the target
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class PolicyWatcher:
    def __init__(self, path: str | Path, install: Callable[[Policy], None]) -> None:
        self.path = Path(path)
        self._install = install
        self._seen = _signature(self.path)
        self.reloads = 0
        self.errors = 0
        self.last_error = ""

    def load_initial(self) -> Policy:
        """At start a bad file is fatal (PolicyError names the line): nothing good to keep."""
        policy = load_policy(self.path)
        self._seen = _signature(self.path)
        return policy

    def check(self) -> bool:
        """Reload if the file changed; True when a new policy was installed."""
        sig = _signature(self.path)
        if sig == self._seen:
            return False
        self._seen = sig
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.error("policy reload refused, keeping the last good policy: %s", exc)
            return False
        self._install(policy)
        self.reloads += 1
        self.last_error = ""
        log.info("policy reloaded from %s: %d keys, %d budgets, %d rate limits", self.path,
                 len(policy.keys), len(policy.budgets), len(policy.rate_limits))
        return True

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # a watcher bug must not end the watching
                self.errors += 1
                log.exception("policy watcher")
