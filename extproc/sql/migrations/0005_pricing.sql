-- Pricing (issue 14): each event's list-price cost and GPU work, and their hourly sums.
-- Money is integer micro-USD (Int64), never floats. price_status says why a cost is 0:
-- `unpriced` (no list price for the model then), `unmetered`; rows from before this migration
-- have '' (never priced). GPU cost is allocated at query time from gpu_work_milli and the
-- pool's hourly rate (migration 0006), because a request's share of an hour is only known once
-- the hour's traffic is (see README "Pricing and chargeback in money").
ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS list_cost_micros Int64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS price_status LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS price_ref LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS gpu_pool LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS gpu_work_milli UInt64 DEFAULT 0;

-- gpu_pool joins the rollup's key (appended: a new column may only be added at the end of the
-- sorting key, and only without a default), so hours of two pools never merge into one row.
ALTER TABLE usage_hourly
    ADD COLUMN IF NOT EXISTS gpu_pool LowCardinality(String),
    MODIFY ORDER BY (team, feature, model, endpoint, hour, gpu_pool);

ALTER TABLE usage_hourly
    ADD COLUMN IF NOT EXISTS list_cost_micros SimpleAggregateFunction(sum, Int64),
    ADD COLUMN IF NOT EXISTS priced_requests SimpleAggregateFunction(sum, UInt64),
    ADD COLUMN IF NOT EXISTS unmetered_requests SimpleAggregateFunction(sum, UInt64),
    ADD COLUMN IF NOT EXISTS gpu_work_milli SimpleAggregateFunction(sum, UInt64);

-- The view gains the new sums. Dropped and created again: between the two statements an
-- insert would reach the raw table but not the rollup, so migrate before serving (the sidecar
-- does at start; `extproc reprice` rebuilds rollup hours from the raw table if ever needed).
DROP VIEW IF EXISTS usage_hourly_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    toStartOfHour(usage_events.start_time)                  AS hour,
    usage_events.team                                       AS team,
    usage_events.feature                                    AS feature,
    usage_events.model                                      AS model,
    usage_events.endpoint                                   AS endpoint,
    usage_events.gpu_pool                                   AS gpu_pool,
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
    quantileTDigestState(usage_events.duration_ns / 1e6)    AS duration_ms_digest,
    sum(usage_events.list_cost_micros)                      AS list_cost_micros,
    countIf(usage_events.price_status = 'priced')           AS priced_requests,
    countIf(NOT usage_events.metered)                       AS unmetered_requests,
    sum(usage_events.gpu_work_milli)                        AS gpu_work_milli
FROM usage_events
GROUP BY hour, team, feature, model, endpoint, gpu_pool;
