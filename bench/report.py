"""Derived figures (vs Envoy alone), the issue's targets, the markdown tables and the chart."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.scenario import BASELINES, CONFIGS

NaN = float("nan")


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"nproc": os.cpu_count(), "cpu": cpu, "loadavg": load, "kernel": platform.release(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def code_state() -> str:
    """The commit measured, and what was modified on top of it (the bench measures the tree)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "extproc"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"git {head}" + (f" + uncommitted: {', '.join(changed)}" if changed else "")


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else NaN


def _baseline(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Envoy alone per workload: the mean of its runs (first and last in the run)."""
    base: dict[str, dict[str, float]] = {}
    for wl in dict.fromkeys(r["workload"] for r in results):
        runs = [r for r in results if r["workload"] == wl and r["config"] in BASELINES]
        if runs:
            keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            base[wl] = {k: _mean([float(r.get(k, NaN)) for r in runs]) for k in keys}
            if len(runs) > 1:
                base[wl]["drift_rps_pct"] = 100 * (runs[-1]["rps"] / runs[0]["rps"] - 1) if runs[0]["rps"] else NaN
    return base


def _derive(r: dict[str, Any], base: dict[str, Any] | None) -> None:
    """vs the Envoy-alone run made just before this one when there is one, else the mean."""
    base = r.get("paired") or base
    if not base:
        return
    r["rps_ratio"] = r["rps"] / base["rps"] if base.get("rps") else NaN
    if "p50_ms" in r:
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
    if "ttft_p50_ms" in r:
        for k in ("ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms"):
            r["added_" + k] = r[k] - base[k]


# (id, text, workload, key, limit, higher is better, configs it applies to)
TARGETS: list[tuple[str, str, str, str, float, bool, str]] = [
    ("rps_ratio", "10 clients, request headers sync: RPS >= 0.40 x Envoy alone", "json-c10", "rps_ratio", 0.40, True,
     "sync,hybrid"),
    ("cpu_req", "sidecar CPU <= 100 us per non-streaming request (c=10)", "json-c10", "sidecar_us_per_req", 100, False, "all"),
    ("cpu_event", "sidecar CPU <= 15 us per SSE event", "sse", "sidecar_us_per_event", 15, False, "all"),
    ("p50", "1 client: added p50 <= 0.5 ms", "json-c1", "added_p50_ms", 0.5, False, "all"),
    ("p99", "1 client: added p99 <= 1.5 ms", "json-c1", "added_p99_ms", 1.5, False, "all"),
    ("ttft", "streaming: added TTFT p50 <= 0.3 ms", "sse", "added_ttft_p50_ms", 0.3, False, "all"),
    ("gap", "streaming: inter-token gap p99 unchanged (added <= 1 ms)", "sse", "added_gap_p99_ms", 1.0, False,
     "all"),
    ("events_core", ">= 20k SSE events/s per sidecar core", "sse", "events_per_core_s", 20_000, True, "all"),
    ("events_core_x4", "  same, at 4x the streams (sse-x4)", "sse-x4", "events_per_core_s", 20_000, True, "all"),
    ("lost", "zero lost events (all workloads)", "*", "events_lost", 0, False, "all"),
    ("ext_proc_errors", "zero Envoy ext_proc stream errors (all workloads)", "*", "ext_proc_errors", 0, False, "all"),
]


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    sidecars = [c for c in dict.fromkeys(r["config"] for r in results)
                if CONFIGS[c].kind == "sidecar" and not CONFIGS[c].processing_mode]  # levers: no
    for cfg in sidecars:
        mode = CONFIGS[cfg].mode
        rows = {r["workload"]: r for r in results if r["config"] == cfg}
        for tid, text, wl, key, limit, higher, applies in TARGETS:
            if applies != "all" and mode not in applies.split(","):
                continue
            if wl == "*":
                value = float(sum(r.get(key, 0) for r in rows.values()))
            elif wl in rows and key in rows[wl]:
                value = float(rows[wl][key])
            else:
                continue
            met = (value >= limit) if higher else (value <= limit)
            out.append({"config": cfg, "target": tid, "text": text, "value": value, "limit": limit,
                        "met": bool(met and not math.isnan(value))})
    return out


# Shown with their range over rounds (--repeat); counts of failures are summed, never a median.
RANGE_KEYS = ("rps_ratio", "added_p50_ms", "added_p99_ms", "sidecar_us_per_req", "envoy_us_per_req",
              "added_ttft_p50_ms", "sidecar_us_per_event", "events_per_core_s")
SUM_KEYS = ("events_lost", "ext_proc_errors", "failed")


def merge_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, workload): the median of each figure over its rounds, failure counts
    summed, and `range` = (min, max) of the key figures. A single run is returned as it is."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["config"], r["workload"]), []).append(r)
    merged = []
    for rows in groups.values():
        if len(rows) == 1:
            merged.append(rows[0])
            continue
        out = dict(rows[0])
        for key, v in rows[0].items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or key == "round":
                continue
            values = [float(r[key]) for r in rows if key in r and not math.isnan(float(r[key]))]
            if key in SUM_KEYS:
                out[key] = type(v)(sum(values))
            elif values:
                med = statistics.median(values)
                out[key] = int(med) if isinstance(v, int) and med.is_integer() else med
        out["rounds"] = len(rows)
        out["range"] = {k: (min(vals), max(vals)) for k in RANGE_KEYS
                        if (vals := [r[k] for r in rows if k in r and not math.isnan(r[k])])}
        out.pop("round", None)
        merged.append(out)
    return merged


def build(results: list[dict[str, Any]], meta: dict[str, Any], profile: dict[str, Any] | None) -> dict[str, Any]:
    """`results`: every run (several per configuration with --repeat), each derived against the
    Envoy-alone run paired with it before rounds are merged."""
    base = _baseline(results)
    for r in results:
        if r["config"] not in BASELINES and CONFIGS[r["config"]].json_upstream == "fixed":
            _derive(r, base.get(r["workload"]))
    merged = merge_rounds(results)
    doc = {"meta": meta, "baseline": base, "results": merged, "targets": _targets(merged),
           "notes": _notes(merged, base, meta, runs=results), "profile": profile}
    if len(merged) < len(results):
        doc["runs"] = results
    return doc


def _get(results: list[dict[str, Any]], cfg: str, wl: str) -> dict[str, Any]:
    return next((r for r in results if r["config"] == cfg and r["workload"] == wl), {})


def _notes(results: list[dict[str, Any]], base: dict[str, dict[str, float]], meta: dict[str, Any],
           runs: list[dict[str, Any]] | None = None) -> list[str]:
    notes = []
    runs = results if runs is None else runs
    sim, direct, envoy = (_get(results, c, "json-c10") for c in ("direct-sim", "direct", "envoy"))
    if sim and direct:
        capped = envoy and sim["rps"] < envoy["rps"]
        notes.append(
            f"Simulator direct, JSON c=10: {sim['rps']:.0f} RPS vs the fixed upstream {direct['rps']:.0f} RPS"
            + (f" and Envoy alone {envoy['rps']:.0f} RPS" if envoy else "")
            + (": the simulator would cap the comparison, so the JSON workload uses a fixed-response "
               "upstream serving the simulator's own response bytes (bench/upstream.py); streaming uses "
               "the simulator." if capped else
               ": the JSON workload still uses the fixed upstream (the simulator's response bytes)."))
    d = _get(results, "direct", "sse")
    if d:
        notes.append(f"Streaming direct to the simulator: median inter-token gap {d['gap_p50_ms']:.1f} ms "
                     f"(nominal {1000 / meta['tokens_per_second']:.1f} ms), p99 {d['gap_p99_ms']:.1f} ms: the "
                     "simulator's own pacing jitter on this machine, the floor for every configuration.")
    for wl, b in base.items():
        if "drift_rps_pct" in b:
            notes.append(f"Envoy alone, {wl}: RPS changed {b['drift_rps_pct']:+.1f}% between the first and the "
                         "last run (noise on a shared machine): sidecar rows compare with the Envoy-alone run "
                         "made just before them.")
    loads = [r["loadavg"] for r in runs]
    if loads:
        notes.append(f"Load average during runs: {min(loads)} .. {max(loads)} (1/5/15 min); other work on the "
                     "machine adds noise.")
    for r in runs:
        if r.get("events_lost"):
            started = r.get("ext_proc", {}).get("streams_started", "?")
            notes.append(
                f"{r['config']} {r['workload']}"
                + (f" (round {r['round'] + 1})" if meta.get("rounds", 1) > 1 else "")
                + f": {r['events_lost']} events lost. Envoy received {r['envoy_rq']} "
                f"requests and started {started} ext_proc streams (errors it counted: "
                f"{r.get('ext_proc_errors', 0)}); the sidecar's handler ran for {r.get('run_streams_opened', '?')} "
                f"streams and emitted {r.get('run_events_emitted', '?')} events, {r['stored_requests']} stored; "
                f"sidecar CPU {r.get('sidecar_cpu_pct', 0):.0f}% of a core."
                + (" Observability mode: Envoy does not wait for the sidecar, so nothing slows the client "
                   "down when streams go missing." if CONFIGS[r["config"]].mode == "observe" else ""))
    gen = meta["loadgen"]
    client = [r["client_cpu_pct"] for r in results if r["workload"].startswith("json") and "client_cpu_pct" in r]
    notes.append(f"Non-streaming load generator: {gen}" + (
        " (1 thread)" if gen == "wrk" else " (the Python one: wrk not installed, or --loadgen python)")
        + (f"; it used up to {max(client):.0f}% of a core." if client else ".")
        + " Streaming load: the Python SSE client (bench/loadgen.py).")
    return notes


# --- markdown ---------------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, fmt)


def _signed(v: Any) -> str:
    return _f(v, "+.2f")


def _cell(r: dict[str, Any], key: str, fmt: str = ".2f") -> str:
    """The value, and its range over rounds when there were several."""
    text = _f(r.get(key), fmt)
    span = r.get("range", {}).get(key)
    if span and text != "–":
        text += f" ({_f(span[0], fmt)}…{_f(span[1], fmt)})"
    return text


def _cpu_cell(r: dict[str, Any], key: str, fmt: str) -> str:
    if key not in r:
        return "–"
    return f"{_cell(r, key, fmt)} [{_f(r.get('sidecar_loop_pct'), '.0f')}, {_f(r.get('sidecar_sys_pct'), '.0f')}]"


def _json_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| config | c=1 RPS | c=1 p50 / p99 ms | c=1 added p50 / p99 ms | c=10 RPS | c=10 ratio "
        "| c=10 p50 / p99 ms | c=10 added p50 / p99 ms | sidecar µs/req [loop %, kernel %] "
        "| sidecar CPU s / 1k req | msgs/req | Envoy µs/req "
        "| lost | ext_proc err | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in dict.fromkeys(r["config"] for r in results):
        a, b = _get(results, cfg, "json-c1"), _get(results, cfg, "json-c10")
        if not (a or b):
            continue
        side = _cpu_cell(b, "sidecar_us_per_req", ".0f")
        lost = [r.get("events_lost") for r in (a, b) if "events_lost" in r]
        err = [r.get("ext_proc_errors") for r in (a, b) if "ext_proc_errors" in r]
        lines.append(
            f"| {cfg} | {_f(a.get('rps'), '.0f')} | {_f(a.get('p50_ms'))} / {_f(a.get('p99_ms'))} "
            f"| {_cell(a, 'added_p50_ms', '+.2f')} / {_cell(a, 'added_p99_ms', '+.2f')} "
            f"| {_f(b.get('rps'), '.0f')} | {_cell(b, 'rps_ratio')} "
            f"| {_f(b.get('p50_ms'))} / {_f(b.get('p99_ms'))} "
            f"| {_signed(b.get('added_p50_ms'))} / {_signed(b.get('added_p99_ms'))} | {side} "
            f"| {_f(b.get('sidecar_s_per_1k_req'), '.3f')} "
            f"| {_f(b.get('msgs_per_req'), '.1f')} | {_cell(b, 'envoy_us_per_req', '.0f')} "
            f"| {sum(lost) if lost else '–'} | {sum(err) if err else '–'} "
            f"| {a.get('failed', 0) + b.get('failed', 0)} |")
    return lines


def _sse_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| config | streams | streams/s | tokens/s | TTFT p50 / p99 ms | added TTFT p50 / p99 ms | gap p50 / p99 ms "
        "| added gap p50 / p99 ms | sidecar µs/event [loop %, kernel %] | sidecar CPU s / 100k tok "
        "| events/s per core | lost | ext_proc err | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in results if r["workload"].startswith("sse")), key=lambda r: r["concurrency"]):
        side = _cpu_cell(r, "sidecar_us_per_event", ".1f")
        lines.append(
            f"| {r['config']} | {r['concurrency']} | {_f(r['rps'], '.1f')} | {_f(r['tokens'] / r['wall_s'], '.0f')} "
            f"| {_f(r['ttft_p50_ms'])} / {_f(r['ttft_p99_ms'])} "
            f"| {_cell(r, 'added_ttft_p50_ms', '+.2f')} / {_signed(r.get('added_ttft_p99_ms'))} "
            f"| {_f(r['gap_p50_ms'])} / {_f(r['gap_p99_ms'])} "
            f"| {_signed(r.get('added_gap_p50_ms'))} / {_signed(r.get('added_gap_p99_ms'))} | {side} "
            f"| {_f(r.get('sidecar_s_per_100k_tokens'), '.2f')} | {_cell(r, 'events_per_core_s', ',.0f')} "
            f"| {r.get('events_lost', '–')} | {r.get('ext_proc_errors', '–')} | {r['failed']} |")
    return lines


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    cfgs = list(dict.fromkeys(t["config"] for t in targets))
    texts = list(dict.fromkeys(t["text"] for t in targets))
    lines = ["| target | " + " | ".join(cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    for text in texts:
        cells = []
        for c in cfgs:
            t = next((t for t in targets if t["config"] == c and t["text"] == text), None)
            if t is None:
                cells.append("n/a")
                continue
            fmt = ",.0f" if abs(t["value"]) >= 1000 else ".2f"
            cells.append(f"{'met' if t['met'] else '**not met**'} ({_f(t['value'], fmt)})")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines


def profile_lines(profile: dict[str, Any] | None) -> list[str]:
    if not profile:
        return []
    lines = [f"### Profile: {profile['what']}", "", profile["method"], ""]
    for name, frames in profile.get("top", {}).items():
        lines += [f"{name}: {profile['samples'].get(name, 0)} {profile.get('unit', 'samples')}; own = in the "
                  "function itself, total = with what it calls",
                  "", "| # | own % | total % | function |", "|---|---|---|---|"]
        for i, fr in enumerate(frames, 1):
            lines.append(f"| {i} | {fr['own_pct']:.1f} | {fr['total_pct']:.1f} | `{fr['function']}` |")
        lines.append("")
    return lines


def _micro_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    return ["### Hot-path pieces in-process (`python -m bench.micro`: CPU µs, no sockets, best of 3)", "",
            "| piece | µs | per |", "|---|---|---|",
            *(f"| {r['what'].strip()} | {r['us']:.2f} | {r['per']} |" for r in rows), ""]


def markdown(doc: dict[str, Any]) -> str:
    m, res = doc["meta"], doc["results"]
    wl = m["workloads"]
    json_s = wl.get("json-c10", wl.get("json-c1", {})).get("seconds", "?")
    sse = wl.get("sse", {})
    lines = [
        "# Benchmark results (`make bench`)", "",
        f"Machine: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, Python {m['python']}; "
        f"{m['date']}; load average {m['loadavg']} at start, {m['loadavg_end']} at end; "
        f"wall time {m['wall_s']} s. Code: {m.get('code', 'unknown')}.", "",
        *([f"Every figure is the median of {m['rounds']} rounds (each configuration measured once per "
           "round, each against its own Envoy-alone run), with its range over the rounds in "
           "parentheses for the key figures; lost, ext_proc err and failed are totals.", ""]
          if m.get("rounds", 1) > 1 else []),
        "Reproduce: `make bench` (`python -m bench.run --help` for subsets); the profile alone: "
        "`python -m bench.profile`; the in-process hot-path pieces: `python -m bench.micro`. "
        "JSON and chart: `bench/results/latest.json`, `bench/results/latest.png` (not committed).", "",
        "Everything on loopback on this machine: load generator, Envoy (`--concurrency 1`; 2 in the "
        "`-envoy2` / `-workers2` rows and their Envoy-alone pairs), upstream, sidecar (a real `extproc "
        "serve` storing to chDB; with worker processes, their CPU is counted with it). \"added\" = minus Envoy alone and ratio = RPS / "
        "Envoy alone's, where Envoy alone is the run made just before the sidecar run (same workload, "
        "paired, against drift on a shared machine; direct: the mean of the envoy and envoy-end rows). "
        "Sidecar CPU from /proc/<pid>/stat, all threads and child processes (loop % = share of the main "
        "process's event-loop thread, "
        "kernel % = share of system time: syscalls, loopback TCP). "
        "lost = requests Envoy received minus events the sidecar stored (counted in ClickHouse per run "
        "through `GET /v1/usage`) minus requests the client abandoned unanswered when the run ended.", "",
        f"## Non-streaming chat JSON ({json_s} s per run)", "", *_json_table(res), "",
        f"## Streaming chat (concurrent SSE streams at {m['tokens_per_second']:g} tok/s, {m['sse_tokens']} "
        f"tokens each, {sse.get('seconds', '?')} s per run; targets use {sse.get('concurrency', '?')} streams)",
        "",
        *_sse_table(res), "",
        "## Targets (issue 5)", "", *_targets_table(doc["targets"]), "",
        "## Notes", "", *(f"- {n}" for n in doc["notes"]), "",
        *profile_lines(doc.get("profile")),
        *_micro_lines(doc.get("micro") or []),
    ]
    return "\n".join(lines).rstrip() + "\n"


# --- chart ------------------------------------------------------------------------------------


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    # Envoy alone and the sidecar configurations: direct would flatten every scale
    cfgs = [c for c in dict.fromkeys(r["config"] for r in res) if c == "envoy" or CONFIGS[c].kind == "sidecar"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))

    def value(c: str, wl: str, key: str) -> float:
        if c == "envoy" and key == "rps_ratio":
            return 1.0
        return float(_get(res, c, wl).get(key, NaN))

    def bars(ax: Any, wl: str, keys: list[tuple[str, str]], title: str, ylabel: str,
             targets: tuple[float, ...] = ()) -> None:
        width = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            vals = [value(c, wl, key) for c in cfgs]
            ax.bar([x + i * width for x in range(len(cfgs))], [0 if math.isnan(v) else v for v in vals],
                   width, label=label)
        for t in targets:
            ax.axhline(t, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(cfgs))], cfgs, rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend(fontsize=8)

    bars(axes[0][0], "json-c10", [("rps_ratio", "c=10")], "Non-streaming RPS / Envoy alone, 10 clients "
         "(target 0.40)", "ratio", (0.40,))
    bars(axes[0][1], "json-c1", [("added_p50_ms", "added p50"), ("added_p99_ms", "added p99")],
         "Added latency vs Envoy alone, 1 client (targets 0.5 / 1.5 ms)", "ms", (0.5, 1.5))
    bars(axes[1][0], "json-c10", [("sidecar_us_per_req", "µs/request (c=10)")],
         "Sidecar CPU per request (target 100 µs) and per SSE event (target 15 µs)", "µs per request", (100,))
    ax = axes[1][0].twinx()
    vals = [value(c, "sse", "sidecar_us_per_event") for c in cfgs]
    ax.plot(range(len(cfgs)), vals, "o", color="C3", label="µs/SSE event")
    ax.axhline(15, color="C3", linestyle=":", linewidth=1)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("µs per SSE event")
    ax.legend(loc="upper right", fontsize=8)
    bars(axes[1][1], "sse", [("added_ttft_p50_ms", "added TTFT p50"), ("added_gap_p99_ms", "added gap p99")],
         "Streaming: added TTFT (target 0.3 ms) and inter-token gap p99", "ms", (0.3,))
    m = doc["meta"]
    fig.suptitle(f"extproc bench, {m['date']}, {m['nproc']} x {m['cpu']}, load {m['loadavg']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
