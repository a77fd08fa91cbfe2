"""scripts/install-system-packages.sh, run hermetically: fake `id` and `apt-get` on a PATH that
lacks the packages, so nothing is installed for real."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-system-packages.sh"
PACKAGES = ("kubectl", "redis-server", "wrk")


def _bin(tmp: Path, uid: int, apt: bool = True, have: tuple[str, ...] = ()) -> dict[str, str]:
    bindir = tmp / "bin"
    bindir.mkdir()
    for tool in ("sh", "cat", "echo", "chmod"):
        (bindir / tool).symlink_to(shutil.which(tool))
    (bindir / "id").write_text(f"#!{shutil.which('sh')}\necho {uid}\n")
    log = tmp / "apt.log"
    if apt:
        # records its arguments; "installs" by creating the binaries the script checks for after
        (bindir / "apt-get").write_text(
            f"#!{shutil.which('sh')}\necho \"$@\" >> {log}\n"
            f"if [ \"$1\" = install ]; then for a in \"$@\"; do case $a in -*|install) ;; *) "
            f"printf '#!/bin/sh\\n' > {bindir}/$a; chmod +x {bindir}/$a;; esac; done; fi\n")
    for name in have:
        (bindir / name).write_text("#!/bin/sh\n")
    for f in bindir.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    return {"PATH": str(bindir), "HOME": str(tmp)}


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shutil.which("sh"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_not_root_prints_how_and_exits_0(tmp_path) -> None:
    out = _run(_bin(tmp_path, uid=1000))
    assert out.returncode == 0
    assert "make system-packages" in out.stderr and "redis-server" in out.stderr
    assert not (tmp_path / "apt.log").exists()


def test_root_installs_only_what_is_missing(tmp_path) -> None:
    env = _bin(tmp_path, uid=0, have=("kubectl",))
    out = _run(env)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0].startswith("update")
    assert calls[1].startswith("install") and calls[1].split()[-2:] == ["redis-server", "wrk"]
    assert "kubectl" not in calls[1]


def test_nothing_missing_does_nothing(tmp_path) -> None:
    out = _run(_bin(tmp_path, uid=0, have=PACKAGES))
    assert out.returncode == 0 and not out.stderr
    assert not (tmp_path / "apt.log").exists()


def test_root_without_apt_get_says_so(tmp_path) -> None:
    out = _run(_bin(tmp_path, uid=0, apt=False))
    assert out.returncode == 0 and "no apt-get" in out.stderr


def test_the_makefile_runs_it_before_the_tests() -> None:
    text = (ROOT / "Makefile").read_text()
    assert "system-packages:\n\tsh scripts/install-system-packages.sh" in text
    test_line = next(line for line in text.splitlines() if line.startswith("test:"))
    assert "system-packages" in test_line
    assert os.access(SCRIPT, os.X_OK)
