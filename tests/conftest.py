"""Suite-wide guard: the batcher's catch-all (an unexpected exception in its worker loop, logged
and retried) hides bugs from every test that only checks the rows in the end. It must never fire:
no test injects such a fault on purpose. Also the simulator, shared by a module's tests."""

from __future__ import annotations

import logging

import pytest

from tests.stack import start_sim

pytest_plugins = ["pytester"]  # test_conftest_guard.py runs the guard on a test of its own

CATCH_ALL = "batcher worker error"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The vLLM simulator's URL (default settings), one per test module."""
    proc, url = start_sim(tmp_path_factory.mktemp("sim"))
    yield url
    proc.stop()


@pytest.fixture(autouse=True)
def _no_batcher_catch_all(caplog: pytest.LogCaptureFixture):
    yield
    # caplog.records would be this teardown's records only: look at the whole test
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    fired = [r for r in records if r.levelno >= logging.ERROR and r.getMessage().startswith(CATCH_ALL)]
    assert not fired, f"{CATCH_ALL}: {fired[0].exc_text or fired[0].getMessage()}"
