"""The suite-wide guard (tests/conftest.py) must fail a test in which the batcher's catch-all fired,
whichever phase logged it: it once looked at the teardown's records only, and saw nothing."""

from __future__ import annotations

from pathlib import Path

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


def test_the_guard_fails_a_test_that_fired_the_catch_all(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent.parent))  # the copy imports tests.stack
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(test_fired='''
import logging

def test_fired_in_call():
    logging.getLogger("extproc.storage.batcher").error("batcher worker error; retrying")

def test_quiet():
    logging.getLogger("extproc.storage.batcher").error("something else")
''')
    # a subprocess: in-process, its log records would reach this test's own guard
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR*test_fired_in_call*"])
