"""`make bench`: direct, Envoy alone and Envoy + sidecar (each mode and transport), side by side
in one run, on a non-streaming and a streaming workload.

    python -m bench.run [--configs a,b] [--seconds 5] [--sse-seconds 8] [--loadgen auto|wrk|python]
                        [--no-profile]

Prints a table; writes bench/results/latest.json, bench/results/latest.png and bench/RESULTS.md.
Loopback only; every load run is bounded in time (and, with the Python generator, in count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import procs, report, scenario, wrk
from bench.scenario import Bench

KEPT_MARKER = "<!-- below: kept by `make bench` -->"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
HERE = Path(__file__).parent
SSE_TOKENS = 64


def _post(port: int, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{scenario.CHAT}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def _bodies(sim_port: int, tokens: int) -> tuple[bytes, bytes, bytes]:
    """(JSON request, the simulator's response to it, streaming request that yields `tokens`
    tokens: the simulator is deterministic per prompt, so pick a prompt long enough)."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Summarize our GPU bill in one line."}],
            "max_tokens": 16}
    response = _post(sim_port, chat)
    for i in range(50):
        stream = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a long story, take {i}."}],
                  "max_tokens": tokens}
        if json.loads(_post(sim_port, stream))["usage"]["completion_tokens"] == tokens:
            break
    stream["stream"] = True
    return json.dumps(chat).encode(), response, json.dumps(stream).encode()


def setup(workdir: Path, loadgen: str, tokens_per_second: float) -> Bench:
    sim_json, sim_json_port = procs.start_sim(workdir, 0)
    sim_stream, sim_stream_port = procs.start_sim(workdir, tokens_per_second)
    json_body, response, sse_body = _bodies(sim_json_port, SSE_TOKENS)
    fixed, fixed_port = procs.start_upstream(workdir, response)
    return Bench(workdir, loadgen, fixed_port, sim_json_port, sim_stream_port, json_body, sse_body,
                 procs=[sim_json, sim_stream, fixed])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(scenario.DEFAULT_CONFIGS),
                   help=f"comma-separated, from: {', '.join(scenario.CONFIGS)}")
    p.add_argument("--levers", action="store_true",
                   help=f"also the lever experiments: {', '.join(scenario.LEVER_CONFIGS)} (~4.5 min more)")
    p.add_argument("--workloads", default="json-c1,json-c10,sse,sse-x4",
                   help="from: json-c1, json-c10, sse, sse-x4 (4x the streams)")
    p.add_argument("--seconds", type=float, default=4.0, help="per non-streaming run")
    p.add_argument("--sse-seconds", type=float, default=5.0, help="per streaming run")
    p.add_argument("--streams", type=int, default=50, help="concurrent SSE streams")
    p.add_argument("--tokens-per-second", type=float, default=100.0, help="simulator speed per stream")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="non-streaming load: wrk when installed (auto), else the Python generator")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of sync-h2")
    p.add_argument("--profile-seconds", type=float, default=6.0)
    p.add_argument("--no-micro", action="store_true", help="skip the in-process hot-path costs (bench.micro)")
    p.add_argument("--no-paired", action="store_true",
                   help="compare with the envoy / envoy-end runs only, not an Envoy-alone run before each")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every configuration N times, round after round; tables show the median "
                        "and each key figure's range over the rounds (lost / errors / failed: totals)")
    p.add_argument("--keep-workdir", action="store_true", help="keep logs, configs and chDB dirs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args()
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")

    wanted = set(args.configs.split(",")) | (set(scenario.LEVER_CONFIGS) if args.levers else set())
    if unknown := wanted - set(scenario.CONFIGS):
        raise SystemExit(f"unknown config(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    loadgen = args.loadgen if args.loadgen != "auto" else ("wrk" if wrk.available() else "python")
    if loadgen == "wrk" and not wrk.available():
        raise SystemExit("wrk not installed (apt-get install wrk), use --loadgen python")
    machine = report.machine_info()
    code = report.code_state()
    print(f"bench: {machine['cpu']} x{machine['nproc']}, load {machine['loadavg']}; "
          f"non-streaming load generator: {loadgen}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    wls = {k: v for k, v in scenario.workloads(args.seconds, args.sse_seconds, args.streams).items()
           if k in args.workloads.split(",")}
    b = setup(workdir, loadgen, args.tokens_per_second)
    b.paired = not args.no_paired
    results: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    micro: list[tuple[str, float, str]] = []
    try:
        for rnd in range(args.repeat):
            for name in [n for n in scenario.CONFIGS if n in wanted]:  # envoy-end stays last in a round
                cfg = scenario.CONFIGS[name]
                print(f"{name}{f' (round {rnd + 1}/{args.repeat})' if args.repeat > 1 else ''}: {cfg.about}",
                      flush=True)
                for r in scenario.run_config(b, cfg, wls, log=lambda s: print(s, flush=True), round_=rnd):
                    results.append({**r, "round": rnd})
        if not args.no_profile:
            from bench import profile as prof

            print("profile: sync-h2 under load", flush=True)
            profile = prof.profile_sync_h2(b, args.profile_seconds)
        if not args.no_micro:
            from bench import micro as micro_mod

            print("micro: in-process costs of the hot-path pieces", flush=True)
            micro = micro_mod.measure(2000)
    finally:
        for proc in b.procs:
            proc.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {**machine, "code": code, "loadgen": loadgen, "wall_s": round(time.monotonic() - started, 1),
            "loadavg_end": report.machine_info()["loadavg"],
            "workdir": str(workdir) if args.keep_workdir else None,
            "workloads": {k: vars(v) for k, v in wls.items()},
            "tokens_per_second": args.tokens_per_second, "sse_tokens": SSE_TOKENS, "rounds": args.repeat}
    doc = report.build(results, meta, profile)
    doc["micro"] = [{"what": w, "us": us, "per": per} for w, us, per in micro]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=2, default=str))
    md = report.markdown(doc)
    # sections measured by other benchmarks (below the marker) survive a regeneration
    old = args.results_md.read_text() if args.results_md.exists() else ""
    kept = old[old.find(KEPT_MARKER):] if KEPT_MARKER in old else ""
    args.results_md.write_text(md.rstrip("\n") + "\n\n" + kept if kept else md)
    wrote = [args.out / "latest.json", args.results_md]
    try:
        report.chart(doc, args.out / "latest.png")
        wrote.append(args.out / "latest.png")
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no chart")
    print()
    print(md)
    print("wrote " + ", ".join(map(str, wrote)))


if __name__ == "__main__":
    main()
