"""`wrk` (Debian package) as the non-streaming load generator when it is installed.

One wrk thread, N connections, bounded by -d (and a hard subprocess timeout); a Lua script sets
the POST and prints a JSON summary with exact percentiles from wrk's histogram. No count bound
inside wrk: stopping a thread from Lua (`wrk.thread:stop()` in response()) made wrk 4.1 report
the full -d as the duration and near-zero latencies, so counts come from the time bound alone
(the Python generator is bounded in both).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess

from bench.loadgen import LoadResult

_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,'
    .. '"timeout":%%d,"p50":%%d,"p90":%%d,"p99":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float,
        script_path: str) -> LoadResult:
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in
                     {"Content-Type": "application/json", **headers}.items())
    with open(script_path, "w") as f:
        f.write(_SCRIPT % {"body": body.decode(), "headers": hdrs})
    cpu0 = _cpu_children()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", script_path, f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    s = json.loads(line[8:])
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    return LoadResult(
        "wrk", ok=s["requests"] - s["status"], failed=errors, wall_s=s["duration_us"] / 1e6,
        tool_percentiles={50: s["p50"] / 1e6, 90: s["p90"] / 1e6, 99: s["p99"] / 1e6},
        client_cpu_s=_cpu_children() - cpu0)
