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


def test_a_running_h2_sidecar_does_not_import_grpc():
    assert not _loaded_after(
        "import asyncio\n"
        "from extproc.app import Sidecar\n"
        "from extproc.config import load_settings\n"
        "async def main():\n"
        "    s = load_settings(None, {'grpc': {'listen': '127.0.0.1:0'}, 'admin': {'host': '127.0.0.1', 'port': 0}},"
        " environ={})\n"
        "    sidecar = Sidecar(s, with_storage=False)\n"
        "    await sidecar.start()\n"
        "    assert type(sidecar.grpc_server).__name__ == 'H2GrpcServer'\n"
        "    await sidecar.stop(0)\n"
        "asyncio.run(main())")


def test_the_check_sees_grpc_when_it_is_imported():
    assert _loaded_after("import extproc.transport.grpcio_server")
