"""`extproc demo` (what `make demo` runs): the whole stack on loopback, traffic from several teams
with the openai client, and the chargeback table it prints, checked row by row."""

from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal

from extproc.devtools.demo import TEAMS
from extproc.devtools.devstack import free_port

COLUMNS = ("team", "feature", "model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens",
           "reasoning_tokens", "total_tokens", "errors", "client_aborted", "cost_usd", "unpriced_requests",
           "gpu_cost_usd")


def _table(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """The rows of the printed table, keyed by (team, feature); the model column may be empty."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["team", "feature", "model"])
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = line.split()
        if len(cells) == len(COLUMNS) - 1:  # no model (an unmetered path)
            cells.insert(2, "")
        row = dict(zip(COLUMNS, cells, strict=True))
        rows[row["team"], row["feature"]] = row
    return rows


def test_demo_prints_a_chargeback_row_per_team_and_feature(tmp_path):
    per_team = 3
    ports = [str(free_port()) for _ in range(5)]
    argv = [sys.executable, "-m", "extproc", "demo", "--requests", str(per_team), "--data-dir", str(tmp_path / "data"),
            "--port", ports[0], "--envoy-admin-port", ports[1], "--grpc-port", ports[2], "--admin-port", ports[3],
            "--sim-port", ports[4], "--tokens-per-second", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = sum(len(features) for features in TEAMS.values()) * per_team
    assert f"sent {sent} requests from {len(TEAMS)} teams" in done.stdout

    rows = _table(done.stdout)
    expected = {(team, feature) for team, features in TEAMS.items() for feature in features}
    # The model listing the demo reads first is a request too: unmetered, and still counted.
    assert set(rows) == expected | {("platform", "unattributed")}, done.stdout
    for key in expected:
        row = rows[key]
        assert row["model"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert int(row["requests"]) == per_team
        assert int(row["errors"]) == 0 and int(row["client_aborted"]) == 0
        prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
        assert prompt > 0
        assert int(row["total_tokens"]) == prompt + completion
        # embeddings produce no output tokens; every other feature generates text
        assert (completion == 0) == key[1].startswith("embeddings"), row
        # deploy/pricing.example.yaml: 0.20 / 0.02 / 0.80 USD per 1M tokens, each request rounded
        cached = int(row["cached_tokens"])
        exact = (Decimal(prompt - cached) * Decimal("0.20") + cached * Decimal("0.02")
                 + completion * Decimal("0.80")) / 10**6
        assert abs(Decimal(row["cost_usd"]) - exact) <= Decimal("0.0000005") * per_team, row
        assert int(row["unpriced_requests"]) == 0 and Decimal(row["gpu_cost_usd"]) > 0, row
    models = rows["platform", "unattributed"]
    assert (models["model"], models["requests"], models["total_tokens"]) == ("", "1", "0")
    assert (Decimal(models["cost_usd"]), models["unpriced_requests"]) == (0, "0")  # unmetered: not billable
    summary = next(line for line in done.stdout.splitlines() if line.startswith("Own GPUs vs list price: "))
    used, idle, listed = (Decimal(x) for x in re.findall(
        r"\(([0-9.]+) USD used by requests, ([0-9.]+) USD idle\); the same requests at list prices: ([0-9.]+) USD$",
        summary)[0])
    assert listed == sum(Decimal(r["cost_usd"]) for r in rows.values())
    # the pool's allocated total is rounded once, each row of the table once
    assert abs(used - sum(Decimal(r["gpu_cost_usd"]) for r in rows.values())) <= Decimal("0.000001") * len(rows)
    assert idle > used > 0
