"""Helpers for tests (ours and end-to-end ones): read metrics in memory, receive OTLP on loopback.

Not used by the sidecar at run time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import grpc
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Attrs = frozenset[tuple[str, Any]]
T = TypeVar("T")
R = TypeVar("R", bound=AbstractAsyncContextManager[Any])


def _key(attrs: Mapping[str, Any]) -> Attrs:
    return frozenset(attrs.items())


class MetricsSnapshot:
    """Data points by metric name and exact attribute set (SDK or OTLP-decoded points).

    Number points expose `.value`; histogram points `.count`, `.sum`, `.bucket_counts`,
    `.explicit_bounds` (SDK) / `.explicit_bounds` (OTLP proto) alike.
    """

    def __init__(self, points: dict[str, dict[Attrs, Any]] | None = None) -> None:
        self.metrics: dict[str, dict[Attrs, Any]] = points or {}

    @classmethod
    def from_sdk(cls, data: MetricsData | None) -> MetricsSnapshot:
        snap = cls()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    series = snap.metrics.setdefault(metric.name, {})
                    for p in metric.data.data_points:
                        series[_key(p.attributes or {})] = p
        return snap

    def names(self) -> set[str]:
        return set(self.metrics)

    def attribute_sets(self, name: str) -> list[dict[str, Any]]:
        return [dict(k) for k in self.metrics.get(name, {})]

    def point(self, name: str, attrs: Mapping[str, Any]) -> Any:
        """The point with exactly `attrs`; KeyError listing what exists otherwise."""
        series = self.metrics.get(name)
        if series is None:
            raise KeyError(f"no metric {name!r}; have {sorted(self.metrics)}")
        try:
            return series[_key(attrs)]
        except KeyError:
            raise KeyError(
                f"{name}: no point with {dict(attrs)}; have {self.attribute_sets(name)}"
            ) from None

    def value(self, name: str, attrs: Mapping[str, Any] | None = None) -> float:
        point = self.point(name, attrs or {})
        if hasattr(point, "as_double"):  # OTLP NumberDataPoint
            return point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
        return point.value

    def series_count(self, name: str) -> int:
        return len(self.metrics.get(name, {}))


def read(reader: InMemoryMetricReader) -> MetricsSnapshot:
    return MetricsSnapshot.from_sdk(reader.get_metrics_data())


# --- OTLP ----------------------------------------------------------------------------------
def _any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def otlp_snapshot(
    requests: list[metrics_service_pb2.ExportMetricsServiceRequest],
) -> MetricsSnapshot:
    """Latest point per (metric, attributes) over all received requests (cumulative data)."""
    snap = MetricsSnapshot()
    for req in requests:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    series = snap.metrics.setdefault(metric.name, {})
                    for p in getattr(metric, kind).data_points:
                        attrs = {a.key: _any_value(a.value) for a in p.attributes}
                        series[_key(attrs)] = p
    return snap


class OtlpHttpReceiver:
    """A minimal OTLP/HTTP metrics endpoint on 127.0.0.1 (POST /v1/metrics, protobuf)."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """Base endpoint, as for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter adds /v1/metrics)."""
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp already undid Content-Encoding (gzip/deflate)
        msg = metrics_service_pb2.ExportMetricsServiceRequest()
        msg.ParseFromString(body)
        self.requests.append(msg)
        self.headers.append(dict(request.headers))
        resp = metrics_service_pb2.ExportMetricsServiceResponse()
        return web.Response(body=resp.SerializeToString(), content_type="application/x-protobuf")

    async def __aenter__(self) -> OtlpHttpReceiver:
        app = web.Application()
        app.router.add_post("/v1/metrics", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def snapshot(self) -> MetricsSnapshot:
        return otlp_snapshot(self.requests)


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: list[metrics_service_pb2.ExportMetricsServiceRequest],
                 headers: list[dict[str, str]] | None = None) -> None:
        self._sink = sink
        self._headers = headers

    async def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self._sink.append(request)
        if self._headers is not None:
            self._headers.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpGrpcReceiver:
    """A minimal OTLP/gRPC MetricsService on 127.0.0.1 (grpc.aio)."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []  # each Export's metadata
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> OtlpGrpcReceiver:
        self._server = grpc.aio.server()
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self.requests, self.headers), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.stop(None)

    def snapshot(self) -> MetricsSnapshot:
        return otlp_snapshot(self.requests)


# --- stand-ins ------------------------------------------------------------------------------
class ReceiverLoop:
    """OTLP receivers entered on an event loop of their own, for synchronous test bodies;
    close() exits them and stops the loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._entered: list[AbstractAsyncContextManager[Any]] = []

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def enter(self, receiver: R) -> R:
        self._run(receiver.__aenter__())
        self._entered.append(receiver)
        return receiver

    def close(self) -> None:
        for receiver in self._entered:
            self._run(receiver.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class FakeStorage:
    """What the storage sink exposes to the self-metrics (attributes and a property)."""

    def __init__(self) -> None:
        self.queue_depth = 42
        self.spool_bytes = 4096
        self.events_dropped = 0
        self.events_spooled = 7
        self.events_inserted = 1000
        self.last_flush_seconds = 0.125
        self.insert_failures = 2
        self.backlog = 50
        self.events_replayed = 3
        self.events_dead_lettered = 1
        self.spool_errors = 0

    @property
    def spool_oldest_age_s(self) -> float:
        return 12.5


VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)


def vllm_metrics_text(*, model: str = VLLM_MODEL, ttft: tuple[float, ...] = (0.03, 0.3)) -> str:
    """vLLM-style /metrics text, built with prometheus_client as vLLM does (same names, labels
    and layout), plus families we do not re-export."""
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    for name, value in (("vllm:num_requests_running", 3), ("vllm:num_requests_waiting", 1),
                        ("vllm:kv_cache_usage_perc", 0.42)):
        Gauge(name, name, labels, registry=reg).labels(model, "0").set(value)
    for name, value in (("vllm:prefix_cache_queries", 1000), ("vllm:prefix_cache_hits", 250),
                        ("vllm:prompt_tokens", 5000), ("vllm:generation_tokens", 700)):
        Counter(name, name, labels, registry=reg).labels(model, "0").inc(value)
    Counter("vllm:request_success", "s", labels + ["finished_reason"], registry=reg).labels(
        model, "0", "stop").inc(9)
    Gauge("process_resident_memory_bytes_x", "x", registry=reg).set(1)
    hist = Histogram("vllm:time_to_first_token_seconds", "ttft", labels,
                     buckets=VLLM_TTFT_BUCKETS, registry=reg)
    for v in ttft:
        hist.labels(model, "0").observe(v)
    return generate_latest(reg).decode()
