-- Exact tokens-per-request percentiles (p50 / p90 / p99) from the raw table.
-- source: raw
-- default_by: model
-- default_limit: 1000
WITH
    quantilesExact(0.5, 0.9, 0.99)(prompt_tokens)     AS prompt_q,
    quantilesExact(0.5, 0.9, 0.99)(completion_tokens) AS completion_q,
    quantilesExact(0.5, 0.9, 0.99)(total_tokens)      AS total_q
SELECT
    {{select}}
    count() AS requests,
    prompt_q[1]     AS prompt_p50,
    prompt_q[2]     AS prompt_p90,
    prompt_q[3]     AS prompt_p99,
    completion_q[1] AS completion_p50,
    completion_q[2] AS completion_p90,
    completion_q[3] AS completion_p99,
    total_q[1]      AS total_p50,
    total_q[2]      AS total_p90,
    total_q[3]      AS total_p99
FROM usage_events
WHERE start_time >= {since:DateTime64(9, 'UTC')}
  AND start_time < {until:DateTime64(9, 'UTC')}
  {{where}}
GROUP BY {{group_by}}
ORDER BY requests DESC{{order_by}}
LIMIT {limit:UInt64}
