-- ON CLUSTER / Replicated variant of ../migrations/0001_usage_events.sql (see ../README.md).
-- One row per metered request: every field of extproc.usage.v1.UsageEvent.
--
-- Labels are a Map (attribution labels are configurable, so no fixed column set fits every
-- deployment); the two chargeback keys used by every report, team and feature, and the
-- effective model are MATERIALIZED into their own LowCardinality columns so ORDER BY, the
-- rollup and filters read them without touching the map. See extproc/sql/README.md.
--
-- Retries are deduplicated by insert_deduplication_token (one per batch, derived from the
-- batch's content): Replicated tables keep the block hashes in Keeper, for the last
-- replicated_deduplication_window blocks (and replicated_deduplication_window_seconds).
CREATE TABLE IF NOT EXISTS usage_events ON CLUSTER '{cluster}'
(
    event_id               String,
    request_id             String,
    start_time             DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    end_time               DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    labels                 Map(LowCardinality(String), String),
    team                   LowCardinality(String) MATERIALIZED labels['team'],
    feature                LowCardinality(String) MATERIALIZED labels['feature'],
    endpoint               LowCardinality(String),
    path                   LowCardinality(String),
    method                 LowCardinality(String),
    request_model          LowCardinality(String),
    response_model         LowCardinality(String),
    model                  LowCardinality(String) MATERIALIZED if(response_model != '', response_model, request_model),
    stream                 Bool,
    http_status            UInt16,
    finish_reason          LowCardinality(String),
    prompt_tokens          UInt64,
    completion_tokens      UInt64,
    cached_tokens          UInt64,
    reasoning_tokens       UInt64,
    total_tokens           UInt64,
    token_source           LowCardinality(String),
    tokenizer              LowCardinality(String),
    time_to_first_token_ns Int64,
    duration_ns            Int64,
    client_aborted         Bool,
    metered                Bool,
    choices                UInt32,
    usage_injected         Bool,
    error                  LowCardinality(String),
    error_detail           String CODEC(ZSTD(3)),
    response_events        UInt32,
    inserted_at            DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/usage_events', '{replica}')
PARTITION BY toYYYYMM(start_time)
ORDER BY (team, feature, model, start_time)
SETTINGS replicated_deduplication_window = 10000;
