"""The sidecar's runtime stands apart from the dev tools: serving never imports the simulator,
the dev stack, the demo or the Envoy config renderer (extproc/devtools)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNTIME = ("extproc.app", "extproc.server", "extproc.exchange", "extproc.processors", "extproc.storage",
           "extproc.telemetry", "extproc.governance.runtime", "extproc.workers.worker", "extproc.workers.pool",
           "extproc.admin", "extproc.recount")


def _devtools_loaded_after(modules: tuple[str, ...]) -> list[str]:
    code = ("import importlib, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('extproc.devtools'))), flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_runtime_imports_no_dev_tool():
    assert _devtools_loaded_after(RUNTIME) == []


def test_the_check_sees_a_dev_tool_when_one_is_imported():
    assert "extproc.devtools.sim" in _devtools_loaded_after(("extproc.devtools.sim",))
