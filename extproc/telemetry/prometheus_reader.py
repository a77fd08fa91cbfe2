"""The Prometheus reader behind the admin /metrics: a pull reader that renders one snapshot.

Why not the exporter's PrometheusMetricReader as it is: it queues every collection it
receives until the next scrape, and a scrape renders each queued collection in turn into the
same metric families, yielding them after each one. `MeterProvider.force_flush` (the admin
API's POST /v1/flush, and GET /v1/usage before it reads) asks every reader to collect,
this one included, so N flushes between two scrapes made the scrape repeat every family N+1
times: N+1 `# HELP` blocks, every sample N+1 times. (The upstream collector is known to do
this when it receives more than one collection per scrape; open-telemetry/opentelemetry-python
PR #5258 describes it.)

A pull reader has nothing to flush: what a scrape shows is what it collects at that moment.
So `force_flush` does not collect, and a received collection replaces any still queued one
(cumulative data: the newest collection holds everything the older ones did), in case
something else calls `collect()` between scrapes.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricsData


class PrometheusPullReader(PrometheusMetricReader):
    """PrometheusMetricReader whose scrape renders exactly the newest collection."""

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True  # pull only: a scrape collects for itself

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if metrics_data is None:
            return
        # The exporter's queue (a deque in the versions we use); left alone if it changes shape.
        queued = getattr(self._collector, "_metrics_datas", None)
        if isinstance(queued, deque):
            queued.clear()
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)
