"""UsageEvent -> measurements. Runs on the gRPC event loop, once per finished request: a cache
lookup and plain arithmetic (the SDK is only involved at collection time)."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry.metrics import Meter

from extproc.config import ConfigError, Settings
from extproc.events import TokenSource, UsageEvent, token_source_name
from extproc.telemetry import names as n
from extproc.telemetry.cardinality import LabelGuard
from extproc.telemetry.counters import AttrKey, ExactCounter
from extproc.telemetry.histograms import HistogramStore, SdkHistogram

# Pricing hook: USD for one event, or None when the model has no price. Nothing provides one
# yet; when pricing exists, pass it to UsageMetrics and extproc.cost.usd appears.
Pricing = Callable[[UsageEvent], float | None]

log = logging.getLogger(__name__)

_NS = 1e-9


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


def _error_type(error: str, http_status: int) -> str | None:
    """Semconv error.type: our error kind, else the HTTP status code for 4xx/5xx."""
    if error:
        return error
    if http_status >= 400:
        return str(http_status)
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


# Slots cached per combination of raw values; past this the cache is dropped and refilled
# (a label flood: every event misses anyway, and the cache must not grow with client input).
MAX_SLOTS = 4096


class _Slot:
    """What one combination of raw attribute values resolves to, computed on its first event:
    guarded attribute keys, counter cells, and histogram series (resolved at first use, since a
    series must not exist before its first recording)."""

    __slots__ = (
        "attributed", "cost", "duration", "duration_key", "folds", "latency_key", "metered",
        "requests", "tokens", "tpot", "ttft", "usage_in", "usage_key", "usage_out",
    )

    def __init__(self) -> None:
        self.folds: tuple[str, ...] = ()  # guard keys folded to "other": counted per event
        self.requests: list[int | float] = []
        self.metered = False  # metered, with a known operation: the gen_ai.* metrics apply
        self.attributed: AttrKey = ()
        self.usage_key: AttrKey | None = None  # None: no token source, no token metrics
        self.latency_key: AttrKey = ()
        self.duration_key: AttrKey = ()
        self.tokens: tuple[list[int | float], ...] = ()
        self.usage_in: Any = None
        self.usage_out: Any = False  # False: embeddings, no output observation
        self.duration: Any = None
        self.ttft: Any = None
        self.tpot: Any = None
        self.cost: list[int | float] | None = None


class UsageRecorder:
    """UsageEvent -> metrics. Per event: one tuple of raw values, one dict lookup for its
    cached _Slot, then plain additions (see histograms.py and counters.py for why)."""

    def __init__(
        self,
        meter: Meter,
        settings: Settings,
        guard: LabelGuard,
        pricing: Pricing | None = None,
        store: HistogramStore | None = None,
    ) -> None:
        self._guard = guard
        self._provider = settings.provider_name or "vllm"
        self._labels = checked_labels(settings)
        self._unattributed = settings.attribution.unattributed
        self._labels_on_latency = settings.metrics.labels_on_latency
        self._pricing = pricing
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        # The store's lock when we aggregate; a lock nobody else takes with SDK histograms.
        self._lock = store.lock if store is not None else threading.Lock()

        def histogram(name: str, unit: str, description: str, buckets: tuple[float, ...]) -> Any:
            if store is not None:
                return store.histogram(name, unit=unit, description=description,
                                       boundaries=buckets)
            return SdkHistogram(meter, name, unit=unit, description=description,
                                boundaries=buckets)

        self._token_usage = histogram(
            n.TOKEN_USAGE, "{token}", "Number of input and output tokens used per request.",
            n.TOKEN_BUCKETS,
        )
        self._duration = histogram(
            n.REQUEST_DURATION, "s",
            "Request duration, from the request headers to the end of the response.",
            n.DURATION_BUCKETS,
        )
        self._ttft = histogram(
            n.TIME_TO_FIRST_TOKEN, "s", "Time to the first output token of streamed responses.",
            n.TTFT_BUCKETS,
        )
        self._tpot = histogram(
            n.TIME_PER_OUTPUT_TOKEN, "s",
            "Time per output token after the first, of streamed responses.", n.TPOT_BUCKETS,
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
        labels = event.labels
        raw = (
            event.endpoint, event.http_status, event.metered, event.client_aborted,
            event.token_source, event.request_model, event.response_model, event.error,
            *map(labels.get, self._labels),
        )
        slot = self._slots.get(raw)
        if slot is None:
            slot = self._resolve(raw)
        elif slot.folds:
            folded = self._guard.folded
            for key in slot.folds:
                folded[key] += 1
        slot.requests[0] += 1
        if not slot.metered:
            return

        has_tokens = slot.usage_key is not None
        duration_ns = event.duration_ns
        with self._lock:  # a collection on the OTLP thread must not see half an event
            if has_tokens:
                prompt = event.prompt_tokens
                completion = event.completion_tokens
                usage = slot.usage_in
                if usage is None:
                    usage = self._resolve_usage(slot)
                usage.record(prompt)
                if slot.usage_out is not False:  # embeddings have no output tokens
                    slot.usage_out.record(completion)
            duration_s = duration_ns * _NS
            if duration_ns > 0:
                hist = slot.duration
                if hist is None:
                    hist = slot.duration = self._duration.series_for(slot.duration_key)
                hist.record(duration_s)
            if event.stream:
                ttft_ns = event.time_to_first_token_ns
                if ttft_ns > 0:
                    ttft_s = ttft_ns * _NS
                    hist = slot.ttft
                    if hist is None:
                        hist = slot.ttft = self._ttft.series_for(slot.latency_key)
                    hist.record(ttft_s)
                    out = event.completion_tokens
                    if out > 1 and duration_ns > ttft_ns:
                        hist = slot.tpot
                        if hist is None:
                            hist = slot.tpot = self._tpot.series_for(slot.latency_key)
                        hist.record((duration_s - ttft_s) / (out - 1))
        if has_tokens:
            cells = slot.tokens
            cells[0][0] += prompt
            cells[1][0] += completion
            cells[2][0] += event.cached_tokens
            cells[3][0] += event.reasoning_tokens
            # last: a failing pricing function must not cost the other measurements
            if self._pricing is not None and self.cost is not None:
                usd = self._pricing(event)
                if usd:
                    cell = slot.cost
                    if cell is None:
                        cell = slot.cost = self.cost.cell(slot.attributed)
                    cell[0] += usd

    def _resolve_usage(self, slot: _Slot) -> Any:
        """Token usage series of a slot (caller holds the lock)."""
        key = slot.usage_key
        assert key is not None
        tt = n.TOKEN_TYPE
        slot.usage_in = self._token_usage.series_for((*key, (tt, "input")))
        if slot.usage_out is not False:
            slot.usage_out = self._token_usage.series_for((*key, (tt, "output")))
        return slot.usage_in

    def _resolve(self, raw: tuple[Any, ...]) -> _Slot:
        """A new slot for `raw`, through the guard in the order the attributes are met (the
        guard's first-come budget and its `folded` counts depend on it)."""
        endpoint, http_status, metered, client_aborted, token_source, request_model, \
            response_model, error = raw[:8]
        guard = self._guard
        folded_before = dict(guard.folded)
        slot = _Slot()

        labels = tuple(
            (name, guard.value(name, value or self._unattributed))
            for name, value in zip(self._labels, raw[8:], strict=True)
        )
        if request_model:
            request_model = guard.value(n.REQUEST_MODEL, request_model)
        err = _error_type(error, http_status)
        if err is not None:
            err = guard.value(n.ERROR_TYPE, err)

        req_key: AttrKey = (
            (n.ENDPOINT, endpoint or "unknown"),
            (n.STATUS_CLASS, status_class(http_status)),
            (n.METERED, metered),
            (n.CLIENT_ABORTED, client_aborted),
            (n.TOKEN_SOURCE, token_source_name(token_source)),
            *labels,
        )
        if request_model:
            req_key += ((n.REQUEST_MODEL, request_model),)
        if err is not None:
            req_key += ((n.ERROR_TYPE, err),)
        slot.requests = self.requests.cell(req_key)

        operation = n.OPERATIONS.get(endpoint, endpoint)
        if metered and operation not in ("", "unknown"):
            # gen_ai.* attributes; request/response model are "conditionally required": omitted
            # when unknown rather than reported as "".
            base: AttrKey = ((n.OPERATION, operation), (n.PROVIDER, self._provider))
            if request_model:
                base += ((n.REQUEST_MODEL, request_model),)
            if response_model:
                base += ((n.RESPONSE_MODEL, guard.value(n.RESPONSE_MODEL, response_model)),)
            attributed = base + labels
            slot.metered = True
            slot.attributed = attributed
            slot.latency_key = attributed if self._labels_on_latency else base
            slot.duration_key = (
                slot.latency_key if err is None else (*slot.latency_key, (n.ERROR_TYPE, err))
            )
            if token_source != TokenSource.NONE:
                slot.usage_key = attributed
                slot.usage_out = None if operation not in n.INPUT_ONLY_OPERATIONS else False
                ett = n.EXTPROC_TOKEN_TYPE
                slot.tokens = tuple(
                    self.tokens.cell((*attributed, (ett, kind)))
                    for kind in ("input", "output", "cached", "reasoning")
                )

        # fold counts repeat on every event of the slot, as a guard.value() call per event would
        slot.folds = tuple(
            key for key, count in guard.folded.items()
            for _ in range(count - folded_before.get(key, 0))
        )
        if len(self._slots) >= MAX_SLOTS:
            self._slots.clear()
        self._slots[raw] = slot
        return slot
