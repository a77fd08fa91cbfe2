"""make bench's report with --repeat: one row per configuration and workload, the median of its
rounds (each derived against its own Envoy-alone pair first), ranges shown, failures summed."""

from __future__ import annotations

from bench import report


def _run(config: str, rnd: int, rps: float, base_rps: float, us: float, lost: int = 0) -> dict:
    r = {"config": config, "workload": "json-c10", "team": f"{config}.json-c10", "concurrency": 10,
         "loadavg": "1.0 1.0 1.0", "ok": int(rps * 4), "failed": 0, "wall_s": 4.0, "rps": rps, "p50_ms": 5.0,
         "p99_ms": 9.0, "round": rnd}
    if config != "envoy":
        r.update(sidecar_us_per_req=us, envoy_us_per_req=500.0, events_lost=lost, ext_proc_errors=0,
                 envoy_rq=r["ok"], stored_requests=r["ok"] - lost,
                 paired={"rps": base_rps, "p50_ms": 2.0, "p99_ms": 6.0})
    return r


META = {"nproc": 2, "cpu": "test cpu", "kernel": "k", "python": "3.11", "date": "today", "loadavg": "1",
        "loadavg_end": "1", "wall_s": 1.0, "code": "git test", "loadgen": "wrk", "tokens_per_second": 100.0,
        "sse_tokens": 64, "workloads": {"json-c10": {"seconds": 4.0}}, "rounds": 3}


def test_rounds_merge_into_medians_with_ranges_and_summed_losses():
    runs = []
    for rnd, (rps, base, us, lost) in enumerate([(1000, 4000, 400, 0), (1500, 5000, 350, 2), (1200, 4000, 500, 1)]):
        runs += [_run("envoy", rnd, base, base, 0), _run("sync-h2", rnd, rps, base, us, lost)]
    doc = report.build(runs, META, None)

    assert len(doc["runs"]) == 6 and len(doc["results"]) == 2
    row = next(r for r in doc["results"] if r["config"] == "sync-h2")
    # each round's ratio against its own pair: 0.25, 0.30, 0.30 -> median 0.30
    assert row["rounds"] == 3 and row["rps_ratio"] == 0.30
    assert row["range"]["rps_ratio"] == (0.25, 0.30)
    assert row["sidecar_us_per_req"] == 400 and row["range"]["sidecar_us_per_req"] == (350, 500)
    assert row["events_lost"] == 3  # a total, never a median
    assert row["concurrency"] == 10 and isinstance(row["concurrency"], int)
    lost = next(t for t in doc["targets"] if t["config"] == "sync-h2" and t["target"] == "lost")
    assert lost["value"] == 3 and not lost["met"]
    assert any("(round 2): 2 events lost" in n for n in doc["notes"])

    md = report.markdown(doc)
    assert "median of 3 rounds" in md
    assert "| 0.30 (0.25…0.30) |" in md and "400 (350…500) [" in md


def test_a_single_round_is_reported_as_measured():
    runs = [_run("envoy", 0, 4000, 4000, 0), _run("sync-h2", 0, 1000, 4000, 400)]
    doc = report.build(runs, {**META, "rounds": 1}, None)
    assert "runs" not in doc
    row = next(r for r in doc["results"] if r["config"] == "sync-h2")
    assert row["rps_ratio"] == 0.25 and "range" not in row
    md = report.markdown(doc)
    assert "median of" not in md and "| 0.25 |" in md
