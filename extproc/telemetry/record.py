"""UsageEvent -> measurements. Runs on the gRPC event loop: plain arithmetic and SDK calls only."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from opentelemetry.metrics import Meter

from extproc.config import ConfigError, Settings
from extproc.events import TokenSource, UsageEvent, token_source_name
from extproc.telemetry import names as n
from extproc.telemetry.cardinality import LabelGuard
from extproc.telemetry.counters import AttrKey, ExactCounter

# Pricing hook: USD for one event, or None when the model has no price. Nothing provides one
# yet; when pricing exists, pass it to UsageMetrics and extproc.cost.usd appears.
Pricing = Callable[[UsageEvent], float | None]

log = logging.getLogger(__name__)

_NS = 1e-9


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


def error_type(event: UsageEvent) -> str | None:
    """Semconv error.type: our error kind, else the HTTP status code for 4xx/5xx."""
    if event.error:
        return event.error
    if event.http_status >= 400:
        return str(event.http_status)
    return None


_RESERVED = (
    n.OPERATION, n.PROVIDER, n.TOKEN_TYPE, n.REQUEST_MODEL, n.RESPONSE_MODEL, n.ERROR_TYPE,
    n.EXTPROC_TOKEN_TYPE, n.ENDPOINT, n.STATUS_CLASS, n.METERED, n.CLIENT_ABORTED, n.TOKEN_SOURCE,
    "le", "otel.scope.name", "otel.scope.version", "otel.scope.schema_url",
)


def _prom(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", name)


def checked_labels(settings: Settings) -> tuple[str, ...]:
    """metrics.labels, refusing names that would collide with our attributes (also after the
    Prometheus translation turns dots into underscores)."""
    reserved = {_prom(r) for r in _RESERVED}
    labels = tuple(dict.fromkeys(settings.metrics.labels))
    for label in labels:
        if _prom(label) in reserved:
            raise ConfigError(f"metrics.labels: {label!r} collides with a metric attribute")
    known = set(settings.attribution.headers.values())
    for label in labels:
        if label not in known:
            log.warning("metrics label %r is not produced by attribution.headers", label)
    return labels


class UsageRecorder:
    def __init__(
        self,
        meter: Meter,
        settings: Settings,
        guard: LabelGuard,
        pricing: Pricing | None = None,
    ) -> None:
        self._guard = guard
        self._provider = settings.provider_name or "vllm"
        self._labels = checked_labels(settings)
        self._unattributed = settings.attribution.unattributed
        self._labels_on_latency = settings.metrics.labels_on_latency
        self._pricing = pricing

        self._token_usage = meter.create_histogram(
            n.TOKEN_USAGE, unit="{token}",
            description="Number of input and output tokens used per request.",
            explicit_bucket_boundaries_advisory=n.TOKEN_BUCKETS,
        )
        self._duration = meter.create_histogram(
            n.REQUEST_DURATION, unit="s",
            description="Request duration, from the request headers to the end of the response.",
            explicit_bucket_boundaries_advisory=n.DURATION_BUCKETS,
        )
        self._ttft = meter.create_histogram(
            n.TIME_TO_FIRST_TOKEN, unit="s",
            description="Time to the first output token of streamed responses.",
            explicit_bucket_boundaries_advisory=n.TTFT_BUCKETS,
        )
        self._tpot = meter.create_histogram(
            n.TIME_PER_OUTPUT_TOKEN, unit="s",
            description="Time per output token after the first, of streamed responses.",
            explicit_bucket_boundaries_advisory=n.TPOT_BUCKETS,
        )
        series = max(2, settings.metrics.max_series)
        self.tokens = ExactCounter(
            meter, n.TOKENS, unit="{token}", max_series=series,
            description="Exact token counts by token.type (cached is part of input, reasoning "
            "part of output: do not sum across token.type).",
        )
        self.requests = ExactCounter(
            meter, n.REQUESTS, unit="{request}", max_series=series,
            description="Finished requests seen by the sidecar.",
        )
        self.cost = (
            ExactCounter(
                meter, n.COST, unit="{USD}", max_series=series,
                description="Cost of the metered usage in US dollars.",
            )
            if pricing is not None
            else None
        )

    def record(self, event: UsageEvent) -> None:
        guard = self._guard
        labels = tuple(
            (name, guard.value(name, event.labels.get(name) or self._unattributed))
            for name in self._labels
        )
        request_model = guard.value(n.REQUEST_MODEL, event.request_model) if event.request_model else ""
        err = error_type(event)
        if err is not None:
            err = guard.value(n.ERROR_TYPE, err)

        req_key: AttrKey = (
            (n.ENDPOINT, event.endpoint or "unknown"),
            (n.STATUS_CLASS, status_class(event.http_status)),
            (n.METERED, event.metered),
            (n.CLIENT_ABORTED, event.client_aborted),
            (n.TOKEN_SOURCE, token_source_name(event.token_source)),
            *labels,
        )
        if request_model:
            req_key += ((n.REQUEST_MODEL, request_model),)
        if err is not None:
            req_key += ((n.ERROR_TYPE, err),)
        self.requests.add(1, req_key)

        operation = n.OPERATIONS.get(event.endpoint, event.endpoint)
        if not event.metered or operation in ("", "unknown"):
            return

        # gen_ai.* attributes; request/response model are "conditionally required": omitted
        # when unknown rather than reported as "".
        base: AttrKey = ((n.OPERATION, operation), (n.PROVIDER, self._provider))
        if request_model:
            base += ((n.REQUEST_MODEL, request_model),)
        if event.response_model:
            base += ((n.RESPONSE_MODEL, guard.value(n.RESPONSE_MODEL, event.response_model)),)
        attributed = base + labels

        has_tokens = event.token_source != TokenSource.NONE
        if has_tokens:
            self._record_tokens(event, operation, attributed)

        latency = dict(attributed if self._labels_on_latency else base)
        duration_s = event.duration_ns * _NS
        if event.duration_ns > 0:
            self._duration.record(
                duration_s, latency if err is None else {**latency, n.ERROR_TYPE: err}
            )
        if event.stream and event.time_to_first_token_ns > 0:
            ttft_s = event.time_to_first_token_ns * _NS
            self._ttft.record(ttft_s, latency)
            out = event.completion_tokens
            if out > 1 and event.duration_ns > event.time_to_first_token_ns:
                self._tpot.record((duration_s - ttft_s) / (out - 1), latency)
        # last: a failing pricing function must not cost the other measurements
        if has_tokens and self.cost is not None and self._pricing is not None:
            usd = self._pricing(event)
            if usd:
                self.cost.add(usd, attributed)

    def _record_tokens(self, event: UsageEvent, operation: str, key: AttrKey) -> None:
        attrs = dict(key)
        tt = n.TOKEN_TYPE
        self._token_usage.record(event.prompt_tokens, {**attrs, tt: "input"})
        if operation != "embeddings":  # embeddings have no output tokens
            self._token_usage.record(event.completion_tokens, {**attrs, tt: "output"})
        ett = n.EXTPROC_TOKEN_TYPE
        self.tokens.add(event.prompt_tokens, (*key, (ett, "input")))
        self.tokens.add(event.completion_tokens, (*key, (ett, "output")))
        self.tokens.add(event.cached_tokens, (*key, (ett, "cached")))
        self.tokens.add(event.reasoning_tokens, (*key, (ett, "reasoning")))
