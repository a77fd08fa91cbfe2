-- Hourly rollup by team / feature / model / endpoint, fed by a materialized view on INSERT into
-- usage_events. Several parts may hold rows for the same key until a merge happens, so every
-- query re-aggregates (sum(...), quantilesTDigestMerge(...)) and GROUP BYs; never read it raw.
CREATE TABLE IF NOT EXISTS usage_hourly
(
    hour                DateTime('UTC'),
    team                LowCardinality(String),
    feature             LowCardinality(String),
    model               LowCardinality(String),
    endpoint            LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    errors              SimpleAggregateFunction(sum, UInt64),
    client_aborted      SimpleAggregateFunction(sum, UInt64),
    prompt_tokens       SimpleAggregateFunction(sum, UInt64),
    completion_tokens   SimpleAggregateFunction(sum, UInt64),
    cached_tokens       SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens    SimpleAggregateFunction(sum, UInt64),
    total_tokens        SimpleAggregateFunction(sum, UInt64),
    duration_ns         SimpleAggregateFunction(sum, UInt64),
    total_tokens_digest AggregateFunction(quantileTDigest, UInt64),
    duration_ms_digest  AggregateFunction(quantileTDigest, Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (team, feature, model, endpoint, hour)
-- a retried insert whose raw block was already stored must not be counted twice here either
SETTINGS non_replicated_deduplication_window = 10000;

-- Source columns are qualified (usage_events.x) because the output aliases reuse their names.
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    toStartOfHour(usage_events.start_time)                  AS hour,
    usage_events.team                                       AS team,
    usage_events.feature                                    AS feature,
    usage_events.model                                      AS model,
    usage_events.endpoint                                   AS endpoint,
    count()                                                 AS requests,
    countIf(usage_events.error != '' OR usage_events.http_status >= 400) AS errors,
    countIf(usage_events.client_aborted)                    AS client_aborted,
    sum(usage_events.prompt_tokens)                         AS prompt_tokens,
    sum(usage_events.completion_tokens)                     AS completion_tokens,
    sum(usage_events.cached_tokens)                         AS cached_tokens,
    sum(usage_events.reasoning_tokens)                      AS reasoning_tokens,
    sum(usage_events.total_tokens)                          AS total_tokens,
    sum(toUInt64(greatest(usage_events.duration_ns, 0)))    AS duration_ns,
    quantileTDigestState(usage_events.total_tokens)         AS total_tokens_digest,
    quantileTDigestState(usage_events.duration_ns / 1e6)    AS duration_ms_digest
FROM usage_events
GROUP BY hour, team, feature, model, endpoint;
