"""`extproc` command line: serve, sim, dev, demo, report, reprice, migrate, envoy-config, keys,
budgets.

Commands and flags are public interface: add, never rename.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from extproc.config import ConfigError, Settings, SpoolSettings, load_settings

log = logging.getLogger("extproc")
# the shipped example, used by `extproc demo` (a source checkout; pip installs lack deploy/)
_EXAMPLE_PRICING = Path(__file__).resolve().parent.parent / "deploy" / "pricing.example.yaml"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _dsn_for(data_dir: str) -> str:
    return "chdb://" + str(Path(data_dir).resolve())


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "transport", None):
        overrides.setdefault("grpc", {})["transport"] = args.transport
    if getattr(args, "listen", None):
        overrides.setdefault("grpc", {})["listen"] = args.listen
    if getattr(args, "workers", None) is not None:
        overrides.setdefault("grpc", {})["workers"] = args.workers
    if getattr(args, "admin_port", None) is not None:
        overrides.setdefault("admin", {})["port"] = args.admin_port
    if getattr(args, "admin_host", None):
        overrides.setdefault("admin", {})["host"] = args.admin_host
    if getattr(args, "dsn", None):
        overrides.setdefault("storage", {})["dsn"] = args.dsn
    elif getattr(args, "data_dir", None):
        overrides.setdefault("storage", {})["dsn"] = _dsn_for(args.data_dir)
    if getattr(args, "spool_dir", None):
        overrides.setdefault("spool", {})["dir"] = args.spool_dir
    if getattr(args, "tokenizer", None):
        overrides.setdefault("tokenizer", {})["models"] = dict(t.split("=", 1) for t in args.tokenizer)
    if getattr(args, "no_force_include_usage", False):
        overrides["usage"] = {"force_include_usage": False}
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    if getattr(args, "pricing", None):
        overrides["pricing"] = {"file": str(Path(args.pricing).resolve())}
    if getattr(args, "policy", None):
        overrides.setdefault("policy", {})["file"] = args.policy
    settings = load_settings(getattr(args, "config", None), overrides)
    if getattr(args, "data_dir", None) and not getattr(args, "spool_dir", None) \
            and settings.spool.dir == SpoolSettings().dir:
        # Two sidecars with their own --data-dir must not share the default spool.
        data = Path(args.data_dir)
        settings.spool.dir = str(data.with_name(data.name + "-spool"))
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.app import Sidecar, loop_factory

    settings = _settings(args)
    _setup_logging(settings.log_level)
    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        runner.run(Sidecar(settings).run_until_signal())
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from extproc.devtools.sim import SimConfig, run_sim

    _setup_logging(args.log_level or "INFO")
    run_sim(SimConfig(
        host=args.host, port=args.port, model=args.model, tokens_per_second=args.tokens_per_second,
        ttft_ms=args.ttft_ms, enable_force_include_usage=args.enable_force_include_usage,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details, reasoning=args.reasoning,
        reasoning_tokens_details=not args.no_reasoning_tokens_details,
        api_key=args.api_key or "", reject_any_key=args.reject_any_key,
    ))
    return 0


def _stack(args: argparse.Namespace):  # noqa: ANN202
    from extproc.devtools.devstack import DevStack, StackPorts

    ports = StackPorts(args.port, args.envoy_admin_port, args.grpc_port, args.admin_port, args.sim_port)
    sim_args = ["--tokens-per-second", str(args.tokens_per_second)]
    serve_args = ["--transport", args.transport] if args.transport else []
    if getattr(args, "pricing", None):
        serve_args += ["--pricing", str(Path(args.pricing).resolve())]
    if getattr(args, "policy", None):
        _check_policy_mode(args.policy, args.mode)
        serve_args += ["--policy", args.policy]
    return DevStack(ports=ports, data_dir=args.data_dir, upstream=args.upstream, mode=args.mode,
                    config=args.config, sim_args=sim_args, serve_args=serve_args, workers=args.workers)


def _check_policy_mode(path: str, mode: str) -> None:
    from extproc.governance.policy import PolicyError, load_policy

    try:
        policy = load_policy(path)
    except PolicyError as exc:
        raise ConfigError(f"--policy: {exc}") from None
    conflicts = policy.observe_conflicts() if mode == "observe" else []
    if conflicts:
        raise ConfigError(
            f"--policy {path} cannot be enforced in observe mode: it has {'; '.join(conflicts)}. In observe "
            "mode Envoy sends traffic to the sidecar without waiting for its answers, so nothing can be "
            "refused or rewritten; use --mode sync or --mode hybrid (the request path stays synchronous)")


def cmd_keys(args: argparse.Namespace) -> int:
    from extproc.governance import keyfile
    from extproc.governance.policy import PolicyError

    try:
        if args.keys_command == "create":
            token, entry = keyfile.create_key(args.policy, team=args.team, feature=args.feature or "",
                                              user=args.user or "", env=args.env or "", name=args.name or "")
            print(token)
            print(f"# key {entry['sha256'][:12]} for team {args.team} added to {args.policy}; the key is shown "
                  "only now (the file keeps its SHA-256)", file=sys.stderr)
        elif args.keys_command == "list":
            rows = keyfile.list_keys(args.policy)
            cols = ["id", "name", "team", "feature", "user", "env", "line"]
            print(_table([[str(r.get(c, "")) for c in cols] for r in rows], cols))
        else:
            entry = keyfile.revoke_key(args.policy, args.ref)
            print(f"revoked key {entry['sha256'][:12]} (team {entry.get('team')}) from {args.policy}")
    except (PolicyError, OSError) as exc:
        print(f"extproc keys: {exc}", file=sys.stderr)
        return 2
    return 0


def _table(rows: list[list[str]], cols: list[str]) -> str:
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def cmd_budgets(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    url = args.admin_url or f"http://{_settings(args).admin.host}:{_settings(args).admin.port}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/budgets", timeout=10) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        print(f"extproc budgets: {url}: HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}",
              file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"extproc budgets: no sidecar answering at {url} ({exc}); budgets live in the running "
              "sidecar (or its Redis): start it, or pass --admin-url", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    rows = []
    for b in data["budgets"]:
        pct = b["used_pct"] or 0.0
        filled = min(20, int(round(pct / 5)))
        bar = "[" + "#" * filled + "." * (20 - filled) + "]"
        fmt = (lambda v: f"${v:,.2f}") if b["unit"] == "usd" else (lambda v: f"{int(v):,}")
        rows.append([b["scope"], b["period"], "hard" if b["hard"] else "soft", fmt(b["spent"]), fmt(b["limit"]),
                     fmt(b["remaining"]), f"{bar} {pct:5.1f}%"])
    print(_table(rows, ["scope", "period", "kind", "spent", "limit", "remaining", "used"]))
    print(f"state: {data['state']}; refused: {data['refused'] or 'none'}"
          + (f"; last reload error: {data['last_reload_error']}" if data.get("last_reload_error") else ""))
    return 0


def _wait_for_signal() -> None:
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: got.append(s))
    while not got:
        signal.pause()


def cmd_dev(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level or "INFO")
    stack = _stack(args)
    stack.start()
    try:
        print(f"extproc dev stack is up (logs in {stack.workdir})")
        print(f"  OpenAI base URL : {stack.url}/v1")
        print(f"  upstream        : {args.upstream or f'simulator on 127.0.0.1:{args.sim_port}'}")
        print(f"  sidecar admin   : {stack.admin_url}  (/metrics, /v1/usage)")
        print(f"  Envoy admin     : http://127.0.0.1:{args.envoy_admin_port}")
        print("Ctrl-C to stop.", flush=True)
        _wait_for_signal()
    finally:
        stack.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from extproc.devtools.demo import run_demo

    _setup_logging(args.log_level or "WARNING")
    return run_demo(_stack(args), requests_per_team=args.requests)


def _report_via_admin(admin_url: str, params: dict[str, str]) -> list[dict[str, Any]] | None:
    url = f"{admin_url.rstrip('/')}/v1/usage?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            rows = orjson.loads(resp.read())["rows"]
        # money travels as exact decimal strings: back to Decimal (Parquet: decimal128, not text)
        return [{k: Decimal(v) if k.endswith("_usd") and isinstance(v, str) else v for k, v in r.items()}
                for r in rows]
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"extproc report: {exc.code} from {url}: {exc.read().decode(errors='replace')}") from None
    except (urllib.error.URLError, ConnectionError):
        return None  # no sidecar running: read the store directly


def cmd_report(args: argparse.Namespace) -> int:
    from extproc.storage.reports import format_rows

    settings = _settings(args)
    if args.by is None:  # gpu_pools counts pool-hours: it groups by pool, not by team
        from extproc.storage.reports import REPORTS

        report = REPORTS.get(args.report)
        args.by = ",".join(report.default_by) if report is not None and report.source == "pools" \
            else "team,feature,model"
    params = {"report": args.report, "by": args.by}
    for key in ("since", "until", "limit"):
        if getattr(args, key):
            params[key] = str(getattr(args, key))
    filters = _filters(args.filter)
    params.update(filters)
    admin_url = args.admin_url or f"http://{settings.admin.host}:{settings.admin.port}"
    rows = _report_via_admin(admin_url, params)
    if rows is None:
        rows = asyncio.run(_report_direct(settings, args))
    format_rows(rows, args.format, args.output)
    return 0


async def _report_direct(settings: Settings, args: argparse.Namespace) -> list[dict[str, Any]]:
    from extproc.storage import open_storage

    try:
        storage = await open_storage(settings)
    except Exception as exc:
        raise SystemExit(
            f"extproc report: cannot open the store {settings.storage.dsn} ({exc}).\n"
            "Embedded ClickHouse allows one process per data directory: if a sidecar is using it,"
            " ask that sidecar instead: --admin-url http://HOST:ADMIN_PORT") from None
    try:
        return await storage.report(
            args.report, [b.strip() for b in args.by.split(",") if b.strip()],
            since=_time(args.since, "--since"), until=_time(args.until, "--until"),
            limit=args.limit, filters=_filters(args.filter) or None,
        )
    finally:
        await storage.close()


def _time(value: str | None, flag: str):  # noqa: ANN202
    from datetime import datetime

    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{flag} must be an ISO 8601 date or time, got {value!r}") from None


def _filters(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--filter takes DIMENSION=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def cmd_reprice(args: argparse.Namespace) -> int:
    since = _time(args.since, "--since")
    settings = _settings(args)
    _setup_logging(settings.log_level)
    admin_url = args.admin_url or f"http://{settings.admin.host}:{settings.admin.port}"
    url = f"{admin_url.rstrip('/')}/v1/reprice?{urllib.parse.urlencode({'since': args.since})}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=600) as resp:
            result = orjson.loads(resp.read())
        print(f"repriced through the running sidecar ({admin_url}), with its pricing file:")
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"extproc reprice: {exc.code} from {url}: {exc.read().decode(errors='replace')}") from None
    except (urllib.error.URLError, ConnectionError):
        result = asyncio.run(_reprice_direct(settings, since))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _reprice_direct(settings: Settings, since: Any) -> dict[str, Any]:
    from extproc.governance.pricing import load_pricing
    from extproc.storage import open_storage

    if not settings.pricing.file:
        raise ConfigError("extproc reprice needs the corrected pricing file: --pricing FILE (or pricing.file)")
    book = load_pricing(settings.pricing.file)
    storage = await open_storage(settings)
    try:
        return await storage.reprice(book, since)
    finally:
        await storage.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    from extproc.storage.client import make_client
    from extproc.storage.migrations import migrate

    settings = _settings(args)
    _setup_logging(settings.log_level)
    applied = migrate(make_client(settings.storage), settings)
    print(f"migrations applied: {applied}")
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc.devtools.envoy_config import EnvoyOptions, render_yaml

    sys.stdout.write(render_yaml(EnvoyOptions(
        upstream=args.upstream, listen_host=args.listen_host, listen_port=args.port,
        admin_port=args.envoy_admin_port, extproc_address=args.extproc, mode=args.mode,
        health_check_path=args.health_check_path,
    )))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML settings file (also EXTPROC_CONFIG)")
    p.add_argument("--log-level", default=None)


def _pricing_flag(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--pricing", metavar="FILE", default=default,
                   help="pricing file: list prices and GPU pools (pricing.file; deploy/pricing.example.yaml)")


def _policy_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="policy file: virtual keys, budgets, rate limits (policy.file)")


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="embedded ClickHouse (chDB) directory, default ./.extproc/data")
    p.add_argument("--dsn", help="storage DSN: chdb:///path or http(s)://user:pass@host:8123/db")
    p.add_argument("--spool-dir", help="on-disk spool (default ./.extproc/spool; <data-dir>-spool with --data-dir)")


def _stack_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", help="use this OpenAI-compatible server (e.g. a real vLLM) instead of the simulator")
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--admin-port", type=int, default=8081)
    p.add_argument("--sim-port", type=int, default=8000)
    p.add_argument("--data-dir", default="./.extproc/data")
    p.add_argument("--mode", choices=("sync", "observe", "hybrid"), default="sync")
    p.add_argument("--tokens-per-second", type=float, default=200.0, help="simulator speed")
    p.add_argument("--transport", choices=("grpcio", "h2"), help="sidecar gRPC server (grpc.transport)")
    p.add_argument("--workers", type=int, default=1,
                   help="sidecar worker processes (grpc.workers); Envoy runs as many worker threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the ext_proc sidecar")
    _common(p)
    _storage_flags(p)
    p.add_argument("--listen", help="gRPC listen address host:port or unix:/path (default 127.0.0.1:50051)")
    p.add_argument("--transport", choices=("grpcio", "h2"), help="gRPC server implementation (grpc.transport)")
    p.add_argument("--workers", type=int, help="processes serving ext_proc on the one port (grpc.workers, default 1)")
    p.add_argument("--admin-host")
    p.add_argument("--admin-port", type=int)
    p.add_argument("--tokenizer", action="append", metavar="MODEL=PATH",
                   help="tokenizer.json for a served model ('llama3' = bundled Llama 3); repeatable")
    p.add_argument("--no-force-include-usage", action="store_true",
                   help="do not set stream_options.include_usage on streaming requests")
    _pricing_flag(p)
    _policy_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sim", help="run the vLLM-compatible simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--tokens-per-second", type=float, default=0.0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--enable-force-include-usage", action="store_true")
    p.add_argument("--enable-prompt-tokens-details", action="store_true")
    p.add_argument("--reasoning", action="store_true", help="stream reasoning text first (delta.reasoning)")
    p.add_argument("--no-reasoning-tokens-details", action="store_true",
                   help="like vLLM before Aug 2026: no usage.completion_tokens_details.reasoning_tokens")
    p.add_argument("--api-key", help="like vLLM --api-key: /v1 requests must carry exactly this bearer key")
    p.add_argument("--reject-any-key", action="store_true",
                   help="refuse /v1 requests that carry Authorization or x-api-key at all")
    p.add_argument("--log-level", default=None)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("dev", help="simulator + sidecar + Envoy in the foreground until Ctrl-C")
    _common(p)
    _stack_flags(p)
    _pricing_flag(p)
    _policy_flag(p)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("demo", help="start the dev stack, send traffic from several teams, print chargeback")
    _common(p)
    _stack_flags(p)
    p.add_argument("--requests", type=int, default=6, help="requests per team")
    _pricing_flag(p, default=str(_EXAMPLE_PRICING) if _EXAMPLE_PRICING.is_file() else None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="chargeback report (through a running sidecar, else from the store)")
    _common(p)
    _storage_flags(p)
    p.add_argument("--report", default="chargeback", help="report name (a SQL file in deploy/clickhouse/queries)")
    p.add_argument("--by", default=None, help="dimensions, comma separated (default team,feature,model; "
                   "gpu_pools: pool)")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--limit", type=int)
    p.add_argument("--format", choices=("table", "json", "csv", "parquet"), default="table")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.add_argument("--filter", action="append", metavar="DIM=VALUE",
                   help="only rows where a dimension has this value, e.g. team=search; repeatable")
    p.add_argument("--admin-url", help="sidecar admin URL (default from settings)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reprice", help="re-price stored events from a time on with the corrected pricing file")
    _common(p)
    _storage_flags(p)
    _pricing_flag(p)
    p.add_argument("--since", required=True, help="ISO 8601 date or time (UTC): from the start of its hour")
    p.add_argument("--admin-url", help="sidecar admin URL (default from settings); it reloads its own pricing file")
    p.set_defaults(func=cmd_reprice)

    p = sub.add_parser("migrate", help="apply ClickHouse migrations")
    _common(p)
    _storage_flags(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("keys", help="virtual keys in a policy file: create, list, revoke")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="print a new key once and add its SHA-256 to the policy file")
    k.add_argument("--policy", required=True)
    k.add_argument("--team", required=True)
    k.add_argument("--feature")
    k.add_argument("--user")
    k.add_argument("--env")
    k.add_argument("--name", help="a name for the key (budgets and rate limits can use it as key: NAME)")
    k = keys.add_parser("list", help="the keys in a policy file (ids and labels, never secrets)")
    k.add_argument("--policy", required=True)
    k = keys.add_parser("revoke", help="remove a key by name, id (hash prefix) or the key itself")
    k.add_argument("--policy", required=True)
    k.add_argument("ref")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("budgets", help="budgets: spend and remaining per scope (from the running sidecar)")
    budgets = p.add_subparsers(dest="budgets_command", required=True)
    b = budgets.add_parser("show", help="spend and remaining per scope, with bars")
    _common(b)
    b.add_argument("--admin-url", help="sidecar admin URL (default from settings)")
    b.add_argument("--format", choices=("table", "json"), default="table")
    b.set_defaults(func=cmd_budgets)

    p = sub.add_parser("envoy-config", help="print an Envoy bootstrap for this sidecar")
    p.add_argument("--upstream", default="http://127.0.0.1:8000")
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--extproc", default="127.0.0.1:50051", help="sidecar address host:port or unix:/path")
    p.add_argument("--mode", choices=("sync", "observe", "hybrid"), default="sync")
    p.add_argument("--health-check-path", default="",
                   help="answered by Envoy itself (503 while draining), for a readiness probe")
    p.set_defaults(func=cmd_envoy_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"extproc: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad report arguments, bad times, ...
        print(f"extproc {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
