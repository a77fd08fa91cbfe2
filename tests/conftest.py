"""Suite-wide guard: the batcher's catch-all (an unexpected exception in its worker loop, logged
and retried) hides bugs from every test that only checks the rows in the end. It must never fire:
no test injects such a fault on purpose."""

from __future__ import annotations

import logging

import pytest

CATCH_ALL = "batcher worker error"


@pytest.fixture(autouse=True)
def _no_batcher_catch_all(caplog: pytest.LogCaptureFixture):
    yield
    fired = [r for r in caplog.records if r.levelno >= logging.ERROR and r.getMessage().startswith(CATCH_ALL)]
    assert not fired, f"{CATCH_ALL}: {fired[0].exc_text or fired[0].getMessage()}"
