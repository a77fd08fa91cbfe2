"""UsageMetrics: the OpenTelemetry EventSink, owner of the MeterProvider and its readers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from extproc import __version__
from extproc.config import Settings
from extproc.events import UsageEvent
from extproc.stats import SidecarStats
from extproc.telemetry.cardinality import LabelGuard
from extproc.telemetry.export import PrometheusHandle, build_meter_provider
from extproc.telemetry.histograms import (
    HistogramStore,
    fast_path_blocker,
    provider_readers,
    reader_supported,
)
from extproc.telemetry.record import Pricing, UsageRecorder
from extproc.telemetry.selfmetrics import SelfMetrics
from extproc.telemetry.vllm_scrape import VllmScraper

log = logging.getLogger(__name__)

METER_NAME = "extproc"


class UsageMetrics:
    """Records every finished UsageEvent as metrics; serves /metrics; pushes OTLP.

    `emit` is synchronous, allocation-light and never raises: recording failures are counted
    (extproc.metrics.record.errors). Shut it down after the storage sink so the final OTLP push
    carries the final storage counters.
    """

    def __init__(
        self,
        settings: Settings,
        provider: MeterProvider,
        *,
        prometheus: PrometheusHandle | None = None,
        stats: SidecarStats | None = None,
        storage: object | None = None,
        pricing: Pricing | None = None,
    ) -> None:
        self.settings = settings
        self.provider = provider
        self.prometheus = prometheus
        self.record_errors = 0
        self._closed = False
        meter = provider.get_meter(METER_NAME, __version__)
        self.guard = LabelGuard(settings.metrics.max_label_values)
        # Histograms: aggregated by us and merged into each reader's collection, unless the
        # provider is configured for something only SDK histograms do (see histograms.py).
        self.histogram_fallback = fast_path_blocker(provider)
        self._histograms: HistogramStore | None = None
        if self.histogram_fallback is None:
            self._histograms = HistogramStore(
                InstrumentationScope(METER_NAME, __version__), settings.metrics.max_series
            )
        else:
            log.info("usage histograms recorded through the OTel SDK (%s): slower per event",
                     self.histogram_fallback)
        self._recorder = UsageRecorder(meter, settings, self.guard, pricing, self._histograms)
        if self._histograms is not None:
            for reader in provider_readers(provider) or ():
                self._histograms.attach(reader)
        self._self_metrics = SelfMetrics(
            meter, stats, self.guard.folded, lambda: self.record_errors, storage
        )
        m = settings.metrics
        self.vllm: VllmScraper | None = (
            VllmScraper(
                m.vllm_metrics_url, meter,
                interval_s=m.vllm_scrape_interval_ms / 1000,
                timeout_s=m.vllm_scrape_timeout_ms / 1000,
            )
            if m.vllm_metrics_url
            else None
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        stats: SidecarStats | None = None,
        *,
        storage: object | None = None,
        pricing: Pricing | None = None,
        extra_readers: Sequence[MetricReader] = (),
    ) -> UsageMetrics:
        provider, prometheus = build_meter_provider(settings, extra_readers=extra_readers)
        return cls(settings, provider, prometheus=prometheus, stats=stats, storage=storage,
                   pricing=pricing)

    def add_metric_reader(self, reader: MetricReader) -> None:
        """Add a reader after construction (provider.add_metric_reader alone would not see
        the usage histograms)."""
        if self._histograms is not None and not reader_supported(reader):
            raise ValueError("this reader's histogram aggregation needs SDK histograms: pass it "
                             "to the MeterProvider at construction instead")
        self.provider.add_metric_reader(reader)
        if self._histograms is not None:
            self._histograms.attach(reader)

    def attach_storage(self, storage: object | None) -> None:
        """Storage (duck-typed: queue_depth, spool_bytes, ...) may be created after us."""
        self._self_metrics.storage = storage

    def render_prometheus(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) for the admin /metrics; LookupError when Prometheus is off."""
        if self.prometheus is None:
            raise LookupError("Prometheus export is disabled (metrics.prometheus: false)")
        return self.prometheus.render_prometheus(accept)

    # --- EventSink -----------------------------------------------------------------------
    def emit(self, event: UsageEvent) -> None:
        if self._closed:
            return
        try:
            self._recorder.record(event)
        except Exception:
            self.record_errors += 1
            if self.record_errors == 1 or self.record_errors % 1000 == 0:  # no log flood
                log.exception("recording metrics for event %s failed (%d so far)",
                              event.event_id, self.record_errors)

    async def start(self) -> None:
        if self.vllm is not None:
            await self.vllm.start()

    async def force_flush(self, timeout: float = 30.0) -> bool:  # noqa: ASYNC109 (EventSink)
        # The SDK blocks (an OTLP export is a synchronous HTTP/gRPC call): keep it off the loop.
        return await asyncio.to_thread(self.provider.force_flush, int(timeout * 1000))

    async def shutdown(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (EventSink)
        if self._closed:
            return
        self._closed = True
        if self.vllm is not None:
            await self.vllm.stop()
        # Final OTLP export, then readers close (the Prometheus collector unregisters).
        await asyncio.to_thread(self.provider.shutdown, int(timeout * 1000))
