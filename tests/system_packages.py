"""Skips for tests that need a system binary this machine may lack (Debian packages)."""

from __future__ import annotations

import shutil

import pytest

INSTALL_HINT = "install it with `make system-packages` (as root; scripts/install-system-packages.sh)"


def need_binary(name: str) -> str:
    """The binary's path, or skip the test saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return path
