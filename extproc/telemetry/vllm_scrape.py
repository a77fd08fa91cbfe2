"""Re-export a few of vLLM's own Prometheus metrics next to ours (extproc.vllm.*).

One dashboard then shows who used the GPUs (our metering) and how well they were used (KV cache,
prefix cache hits, queue, vLLM's view of TTFT). A periodic task scrapes vLLM's /metrics into a
snapshot; observable instruments report the snapshot at collection time. A failed scrape is
counted, clears the snapshot (stale gauges would lie) and sets extproc.vllm.up to 0; it never
raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client.parser import text_string_to_metric_families

from extproc.telemetry import names as n

log = logging.getLogger(__name__)

# vLLM labels kept; the rest (e.g. finished_reason variants) are summed away.
KEPT_LABELS = ("model_name", "engine")
MAX_BODY_BYTES = 16 << 20


@dataclass(frozen=True)
class Spec:
    name: str  # OTel instrument name
    kind: str  # "gauge" | "counter"
    unit: str
    description: str
    # vLLM sample names, preferred first (older vLLM spells some differently); the first one
    # present in a scrape is used, so renamed-but-duplicated metrics are not double counted
    sources: tuple[str, ...]
    keep_le: bool = False


_TTFT = "vllm:time_to_first_token_seconds"
SPECS: tuple[Spec, ...] = (
    Spec(f"{n.VLLM_PREFIX}kv_cache.usage_ratio", "gauge", "1",
         "vLLM KV-cache usage (1 = full).",
         ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    Spec(f"{n.VLLM_PREFIX}requests.running", "gauge", "{request}",
         "Requests in vLLM's running batch.", ("vllm:num_requests_running",)),
    Spec(f"{n.VLLM_PREFIX}requests.waiting", "gauge", "{request}",
         "Requests waiting in vLLM's queue.", ("vllm:num_requests_waiting",)),
    Spec(f"{n.VLLM_PREFIX}prefix_cache.queries", "counter", "{token}",
         "Tokens queried in vLLM's prefix cache.",
         ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")),
    Spec(f"{n.VLLM_PREFIX}prefix_cache.hits", "counter", "{token}",
         "Tokens found in vLLM's prefix cache.",
         ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")),
    Spec(f"{n.VLLM_PREFIX}prompt_tokens", "counter", "{token}",
         "Prompt tokens processed, as counted by vLLM.", ("vllm:prompt_tokens_total",)),
    Spec(f"{n.VLLM_PREFIX}generation_tokens", "counter", "{token}",
         "Generated tokens, as counted by vLLM.", ("vllm:generation_tokens_total",)),
    # vLLM's TTFT histogram as cumulative bucket counters with `le`: histogram_quantile works on
    # any series carrying `le` (observable instruments cannot be histograms).
    Spec(f"{n.VLLM_PREFIX}time_to_first_token.bucket", "counter", "{request}",
         "vLLM's time-to-first-token histogram buckets (cumulative, by le).",
         (f"{_TTFT}_bucket",), keep_le=True),
    Spec(f"{n.VLLM_PREFIX}time_to_first_token.count", "counter", "{request}",
         "Requests in vLLM's time-to-first-token histogram.", (f"{_TTFT}_count",)),
    Spec(f"{n.VLLM_PREFIX}time_to_first_token.sum", "counter", "s",
         "Sum of vLLM's time-to-first-token observations.", (f"{_TTFT}_sum",)),
)

Series = dict[tuple[tuple[str, str], ...], float]


def _prefixes() -> tuple[str, ...]:
    out = set()
    for spec in SPECS:
        for src in spec.sources:
            for suffix in ("_total", "_bucket", "_count", "_sum"):
                src = src.removesuffix(suffix)
            out.add(src)
    return tuple(sorted(out))


_PREFIXES = _prefixes()


def _relevant(text: str) -> str:
    """Only the lines of families we re-export: vLLM's /metrics is large, and parsing all of it
    on the event loop every few seconds would be wasted work."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2].startswith(_PREFIXES):
                keep.append(line)
        elif line.startswith(_PREFIXES):
            keep.append(line)
    return "\n".join(keep) + "\n"


def parse_vllm_metrics(text: str) -> dict[str, Series]:
    """vLLM Prometheus text -> {instrument name: {attributes: value}}. Raises on bad text."""
    by_sample: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(_relevant(text)):
        for sample in family.samples:
            by_sample.setdefault(sample.name, []).append((sample.labels, sample.value))
    out: dict[str, Series] = {}
    for spec in SPECS:
        source = next((s for s in spec.sources if s in by_sample), None)
        if source is None:
            continue
        series: Series = {}
        keys = KEPT_LABELS + ("le",) if spec.keep_le else KEPT_LABELS
        for labels, value in by_sample[source]:
            attrs = tuple((k, labels[k]) for k in keys if k in labels)
            series[attrs] = series.get(attrs, 0.0) + value
        out[spec.name] = series
    return out


class VllmScraper:
    def __init__(
        self,
        url: str,
        meter: Meter,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
    ) -> None:
        self.url = url
        self._interval = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._snapshot: dict[str, Series] = {}  # replaced whole, never mutated: thread-safe reads
        self.up = False
        self.scrapes = 0
        self.failures = 0
        self.last_error = ""
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

        for spec in SPECS:
            create = (
                meter.create_observable_gauge
                if spec.kind == "gauge"
                else meter.create_observable_counter
            )
            create(spec.name, [self._callback(spec.name)], unit=spec.unit,
                   description=spec.description)
        meter.create_observable_gauge(
            # no unit: the collector would turn "1" into a _ratio suffix the sidecar does not add
            n.VLLM_UP, [lambda _o: [Observation(1 if self.up else 0)]], unit="",
            description="1 when the last scrape of vLLM's /metrics succeeded.",
        )
        meter.create_observable_counter(
            n.VLLM_SCRAPE_FAILURES, [lambda _o: [Observation(self.failures)]], unit="{scrape}",
            description="Failed scrapes of vLLM's /metrics.",
        )

    def _callback(self, name: str):
        def cb(_options: CallbackOptions) -> Iterable[Observation]:
            series = self._snapshot.get(name, {})
            return [Observation(v, dict(attrs)) for attrs, v in series.items()]

        return cb

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vllm-metrics-scrape")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def scrape_once(self) -> bool:
        self.scrapes += 1
        try:
            text = await self._fetch()
            snapshot = parse_vllm_metrics(text)
            if not snapshot:
                raise RuntimeError("no vllm:* metrics we re-export in the response")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self._snapshot = {}
            # warn on the transition only: a down vLLM must not flood the log
            level = logging.WARNING if self.up or self.failures == 1 else logging.DEBUG
            log.log(level, "scraping vLLM metrics from %s failed: %r", self.url, exc)
            self.up = False
            self.last_error = repr(exc)
            return False
        self._snapshot = snapshot
        self.up = True
        self.last_error = ""
        return True

    async def _fetch(self) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Accept": "text/plain;version=0.0.4"}
        async with self._session.get(self.url, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise RuntimeError(f"response larger than {MAX_BODY_BYTES} bytes")
        return body.decode("utf-8", errors="replace")
