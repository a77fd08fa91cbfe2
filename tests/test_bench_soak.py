"""bench/soak.py (make soak) in miniature: a few seconds of its mixed traffic through the real
stack must account for every request (lost 0) and report the resources it watches."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bench import soak


def test_a_short_soak_loses_nothing(capsys) -> None:
    assert soak.main(["--seconds", "3", "--clients", "2"]) == 0
    out = capsys.readouterr().out
    assert "lost 0;" in out and "errors 0" in out
    assert out.count("RSS ") == 2 and "fds " in out and "spool " in out  # start and end
    m = re.search(r"requests answered (\d+), events stored (\d+), lost 0;", out)
    assert m and int(m.group(1)) == int(m.group(2)) > 0, out


def test_resource_readers_see_this_process(tmp_path: Path) -> None:
    assert soak.rss_bytes(os.getpid()) > 1 << 20
    with open(tmp_path / "f", "w"):
        n = soak.open_fds(os.getpid())
    assert n >= 4
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "seg").write_bytes(b"x" * 1000)
    assert soak.dir_bytes(tmp_path / "d") == 1000
    assert soak.dir_bytes(tmp_path / "missing") == 0


@pytest.mark.parametrize("args", [["--seconds", "0"], ["--clients", "0"]])
def test_bad_bounds_are_refused(args: list[str]) -> None:
    with pytest.raises(SystemExit) as err:
        soak.main(args)
    assert err.value.code == 2
