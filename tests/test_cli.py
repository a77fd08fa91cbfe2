"""The CLI as users run it: `extproc dev` in the foreground, `extproc report` through the running
sidecar (chDB allows one process per data directory), then straight from the store after stop."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from extproc.devtools.devstack import free_port

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra", [[], ["--transport", "grpcio"], ["--workers", "2"]],
                         ids=["default", "grpcio", "workers"])
def test_dev_report_live_and_after_stop(tmp_path, extra):
    ports = {k: free_port() for k in ("port", "envoy-admin-port", "grpc-port", "admin-port", "sim-port")}
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "extproc", "dev", "--data-dir", str(data), "--tokens-per-second", "0", *extra]
    for k, v in ports.items():
        argv += [f"--{k}", str(v)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        base = f"http://127.0.0.1:{ports['port']}/v1"
        assert base in out, out

        usage = {"prompt": 0, "completion": 0}
        for team in ("alpha", "beta", "alpha"):
            client = openai.OpenAI(base_url=base, api_key="k", default_headers={"x-team": team, "x-feature": "cli"})
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {team}"}],
                                               max_tokens=7)
            usage["prompt"] += r.usage.prompt_tokens
            usage["completion"] += r.usage.completion_tokens

        # While the stack runs, the data directory is locked by the sidecar: report goes through its API.
        live = _cli("report", "--by", "team", "--format", "json",
                    "--admin-url", f"http://127.0.0.1:{ports['admin-port']}")
        assert live.returncode == 0, live.stderr
        rows = {r["team"]: r for r in json.loads(live.stdout)}
        assert rows["alpha"]["requests"] == 2 and rows["beta"]["requests"] == 1
        assert sum(r["prompt_tokens"] for r in rows.values()) == usage["prompt"]
        assert sum(r["completion_tokens"] for r in rows.values()) == usage["completion"]
        if "--workers" in extra:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin-port']}/v1/stats", timeout=10) as r:
                workers = json.loads(r.read())["workers"]
            assert workers["running"] == 2 and workers["restarts"] == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0

    # Stopped: the same numbers straight from the store, as CSV into a file.
    target = tmp_path / "out.csv"
    after = _cli("report", "--by", "team,feature", "--format", "csv", "--output", str(target),
                 "--data-dir", str(data), "--admin-url", f"http://127.0.0.1:{free_port()}")
    assert after.returncode == 0, after.stderr
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    assert {(r["team"], r["feature"]) for r in rows} == {("alpha", "cli"), ("beta", "cli")}
    assert sum(int(r["completion_tokens"]) for r in rows) == usage["completion"]
    only = _cli("report", "--by", "team", "--filter", "team=beta", "--format", "json",
                "--data-dir", str(data), "--admin-url", f"http://127.0.0.1:{free_port()}")
    assert only.returncode == 0, only.stderr
    assert [r["team"] for r in json.loads(only.stdout)] == ["beta"]


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  dsn: mysql://nope\n")
    out = _cli("serve", "--config", str(bad))
    assert out.returncode == 2 and "storage.dsn" in out.stderr
    bad.write_text("nonsense_key: 1\n")
    out = _cli("serve", "--config", str(bad))
    assert out.returncode == 2 and "unknown config key nonsense_key" in out.stderr


def test_envoy_config_command_renders_valid_yaml():
    out = _cli("envoy-config", "--upstream", "http://vllm:8000", "--extproc", "unix:/run/extproc.sock")
    assert out.returncode == 0 and "ext_proc" in out.stdout and "/run/extproc.sock" in out.stdout


def test_report_arguments_are_checked_with_a_clear_message(tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    out = _cli("report", "--by", "team,nonsense", "--data-dir", str(tmp_path / "d"), "--admin-url", nowhere)
    assert out.returncode == 2 and "nonsense" in out.stderr and "Traceback" not in out.stderr
    out = _cli("report", "--since", "yesterday", "--data-dir", str(tmp_path / "d"), "--admin-url", nowhere)
    assert out.returncode == 2 and "--since" in out.stderr and "Traceback" not in out.stderr


def test_data_dir_gets_its_own_spool_unless_one_is_configured(tmp_path):
    from extproc.cli import _settings, build_parser

    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path / "a")])
    assert _settings(args).spool.dir == str(tmp_path / "a-spool")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("spool:\n  dir: /var/lib/extproc/spool\n")
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path / "a"), "--config", str(cfg)])
    assert _settings(args).spool.dir == "/var/lib/extproc/spool"


def test_report_on_a_directory_held_by_a_running_sidecar_says_what_to_do(tmp_path):
    from tests.stack import serve_process

    data = tmp_path / "held"
    proc, _, _ = serve_process(tmp_path, data_dir=data)
    proc.start()
    try:
        out = _cli("report", "--data-dir", str(data), "--admin-url", f"http://127.0.0.1:{free_port()}")
    finally:
        proc.stop()
    assert out.returncode != 0 and "--admin-url" in out.stderr and "Traceback" not in out.stderr


def test_event_loop_and_insert_format_are_checked(monkeypatch):
    import importlib.util

    from extproc.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="grpc.event_loop must be asyncio or uvloop"):
        load_settings(None, {"grpc": {"event_loop": "trio"}}, environ={})
    with pytest.raises(ConfigError, match="storage.insert_format must be protobuf or arrow"):
        load_settings(None, {"storage": {"insert_format": "csv"}}, environ={})
    assert load_settings(None, {"grpc": {"event_loop": "uvloop"}}, environ={}).grpc.event_loop == "uvloop"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'extproc\[uvloop\]'"):
        load_settings(None, {"grpc": {"event_loop": "uvloop"}}, environ={})
