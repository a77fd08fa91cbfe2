"""grpc.workers > 1 with a pricing file: the events the worker processes relay are priced by the
parent's pricing stage (its own module: chDB opens one data path per process, and the module
fixture of tests/test_e2e_pricing.py holds one)."""

from __future__ import annotations

import json
import urllib.request
from decimal import Decimal

from tests.stack import metered_stack, sidecar_settings, start_sim, wait_events
from tests.test_e2e_pricing import PRICES, _list_cost, _send, _write_pricing


def test_events_relayed_by_worker_processes_are_priced_by_the_parent(tmp_path):
    pricing = tmp_path / "pricing.yaml"
    _write_pricing(pricing, PRICES)
    settings = sidecar_settings(tmp_path, grpc={"transport": "h2", "workers": 2},
                                pricing={"file": str(pricing)})
    sim, sim_url = start_sim(tmp_path, "--tokens-per-second", "0")
    try:
        with metered_stack(tmp_path, sim_url, settings, concurrency=2) as (url, rec, sc):
            usage = [_send(url, "search", i) for i in range(6)]
            events = [e for i in range(6) for e in wait_events(rec, f"search-{i}", 1)]
            assert all(e.price_status == "priced" and e.gpu_pool == "sim-gpu" for e in events)
            expected = sum(_list_cost(p, c, o, PRICES) for _, p, c, o in usage)
            assert sum(e.list_cost_micros for e in events) == int(expected * 10**6)
            rows = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{sc.sidecar.admin_port}/v1/usage?by=team", timeout=60).read())["rows"]
            assert Decimal(rows[0]["cost_usd"]) == expected
    finally:
        sim.stop()
