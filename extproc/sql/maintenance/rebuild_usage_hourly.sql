-- Rebuilds the hourly rollup from the raw table for hours >= {since}: the same SELECT as the
-- materialized view usage_hourly_mv (migration 0005), restricted to those hours. Used by
-- `extproc reprice` after it re-priced the raw events, once the rollup rows of those hours
-- are deleted (a mutation does not reach the rollup). tests/test_reprice.py checks that a
-- rebuild gives back exactly what the view wrote.
-- Columns are named: INSERT ... SELECT maps by position, not by name.
INSERT INTO usage_hourly (hour, team, feature, model, endpoint, gpu_pool, requests, errors, client_aborted, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, duration_ns, total_tokens_digest, duration_ms_digest, list_cost_micros, priced_requests, unmetered_requests, gpu_work_milli)
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
WHERE usage_events.start_time >= {since:DateTime64(9, 'UTC')}
GROUP BY hour, team, feature, model, endpoint, gpu_pool;
