"""vLLM's own Prometheus metrics (names, help, buckets and labels as vLLM V1 exposes them),
fed by the traffic the simulator serves. One registry per app, so several sims can coexist."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

_LABELS = ("model_name", "engine")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class SimMetrics:
    def __init__(self, model_name: str, kv_cache_blocks: int, block_size: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _LABELS, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=r)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(**labels)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed.").labels(**labels)
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        ).labels(**labels)
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels(**labels)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                (*_LABELS, "finished_reason"), registry=r)
        self._labels = labels
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches."
                             ).labels(**labels)
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."
                             ).labels(**labels)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
                              ).labels(**labels)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS).labels(**labels)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS).labels(**labels)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _E2E_BUCKETS).labels(**labels)
        self._kv_capacity = max(kv_cache_blocks * block_size, 1)
        self._kv_tokens = 0

    def start(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request enters the batch: its prompt is prefilled (cached part included, as vLLM
        counts it) and occupies KV cache."""
        self.running.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)
        self._hold(prompt_tokens)

    def generated(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)
            self._hold(n)

    def finish(self, finished_reason: str, kv_tokens: int, e2e_seconds: float) -> None:
        self.running.dec()
        self._hold(-kv_tokens)
        self._success.labels(**self._labels, finished_reason=finished_reason).inc()
        self.e2e.observe(e2e_seconds)

    def _hold(self, tokens: int) -> None:
        self._kv_tokens += tokens
        self.kv_usage.set(min(self._kv_tokens / self._kv_capacity, 1.0))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type, negotiated on Accept like vLLM's prometheus ASGI app (plain
        0.0.4 text unless the scraper asks for OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
