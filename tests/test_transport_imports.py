"""The h2 hot path never imports grpcio: a sidecar on `grpc.transport: h2` does not load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _loaded_after(imports: str) -> bool:
    code = f"import sys\n{imports}\nprint('grpc' in sys.modules, flush=True)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=True, timeout=120)
    return out.stdout.strip() == "True"


def test_h2_server_and_service_do_not_import_grpc():
    assert not _loaded_after("import extproc.transport.h2server, extproc.transport.h2conn, extproc.server, "
                             "extproc.wire, extproc.app")


def test_the_check_sees_grpc_when_it_is_imported():
    assert _loaded_after("import extproc.transport.grpcio_server")
