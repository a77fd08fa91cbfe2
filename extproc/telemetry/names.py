"""Instrument names, attribute keys and bucket boundaries: the public metric surface.

OTel names are listed here once; the Prometheus side is the standard translation done by the
exporter (dots -> underscores, unit suffix from the unit, `_total` on counters, `{...}` unit
annotations dropped), e.g. `gen_ai.server.time_to_first_token` (s) ->
`gen_ai_server_time_to_first_token_seconds_bucket`. Dashboards and tests rely on these names:
rename nothing.
"""

from __future__ import annotations

# --- GenAI semantic conventions (histograms) -----------------------------------------------
TOKEN_USAGE = "gen_ai.client.token.usage"  # {token}
REQUEST_DURATION = "gen_ai.server.request.duration"  # s
TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"  # s
TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"  # s

# --- exact counters in our own namespace (histograms are not for totals) ---------------------
TOKENS = "extproc.tokens"  # {token}, attribute token.type = input|output|cached|reasoning
REQUESTS = "extproc.requests"  # {request}
# Cost in USD, recorded only when a pricing function is configured (none exists yet).
COST = "extproc.cost.usd"  # {USD} -> extproc_cost_usd_total

# --- attribute keys ---------------------------------------------------------------------------
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
TOKEN_TYPE = "gen_ai.token.type"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
ERROR_TYPE = "error.type"
# Our own counters: cached is a subset of input and reasoning a subset of output, so never sum
# extproc.tokens across token.type.
EXTPROC_TOKEN_TYPE = "token.type"
ENDPOINT = "endpoint"
STATUS_CLASS = "http.status_class"
METERED = "metered"
CLIENT_ABORTED = "client_aborted"
TOKEN_SOURCE = "token.source"

# Value a label takes once its distinct-value budget is spent (see cardinality.py).
OTHER = "other"

# endpoint of the UsageEvent -> gen_ai.operation.name
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings",
              # vLLM's other routes (each processor's `operation`; the UsageEvent carries it too).
              # The Responses and Messages APIs are chat; the GenAI conventions name no operation
              # for scoring, pooling or speech to text: these custom names are documented in README.
              "responses": "chat", "messages": "chat", "cohere_embed": "embeddings",
              "rerank": "rerank", "score": "score", "classify": "classify", "pooling": "pooling",
              "transcription": "transcription", "translation": "translation"}
# Operations with input tokens only: no output token usage series.
INPUT_ONLY_OPERATIONS = frozenset(("embeddings", "rerank", "score", "classify", "pooling"))

# Bucket boundaries advised by the GenAI semantic conventions.
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(4**i) for i in range(14))  # 1 .. 67108864
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
TPOT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)

# --- sidecar self-metrics (observable, read from SidecarStats and the storage object) --------
STREAMS_OPENED = "extproc.ext_proc.streams.opened"
STREAMS_CLOSED = "extproc.ext_proc.streams.closed"  # includes cancelled ones
STREAMS_CANCELLED = "extproc.ext_proc.streams.cancelled"
STREAMS_ACTIVE = "extproc.ext_proc.streams.active"
MESSAGES = "extproc.ext_proc.messages"  # attribute kind
ERRORS = "extproc.ext_proc.errors"  # attribute kind
UNMETERED = "extproc.requests.unmetered"
REFUSED = "extproc.requests.refused"
EVENTS_EMITTED = "extproc.events.emitted"
# Output deltas seen while responses stream: a live, approximate tokens/s between events.
LIVE_OUTPUT_TOKENS = "extproc.tokens.live_output"
LABELS_REJECTED = "extproc.labels.rejected"  # attribute label
LABELS_FOLDED = "extproc.metrics.labels.folded"  # attribute label: values reported as "other"
RECORD_ERRORS = "extproc.metrics.record.errors"

QUEUE_DEPTH = "extproc.storage.queue.depth"
SPOOL_SIZE = "extproc.storage.spool.size"  # By
SPOOL_OLDEST_AGE = "extproc.storage.spool.oldest_age"  # s
LAST_FLUSH_DURATION = "extproc.storage.last_flush.duration"  # s
EVENTS_INSERTED = "extproc.storage.events.inserted"
EVENTS_SPOOLED = "extproc.storage.events.spooled"
EVENTS_DROPPED = "extproc.storage.events.dropped"  # must stay 0
INSERT_FAILURES = "extproc.storage.insert.failures"
BACKLOG = "extproc.storage.backlog"  # emitted, not yet in ClickHouse (memory queue + spool)
EVENTS_REPLAYED = "extproc.storage.events.replayed"
EVENTS_DEAD_LETTERED = "extproc.storage.events.dead_lettered"
SPOOL_ERRORS = "extproc.storage.spool.errors"

# --- vLLM re-export (vllm_scrape.py) -----------------------------------------------------------
VLLM_PREFIX = "extproc.vllm."
VLLM_UP = "extproc.vllm.up"
VLLM_SCRAPE_FAILURES = "extproc.vllm.scrape.failures"
