-- Approximate (t-digest) percentiles of request duration and tokens per request, from the
-- hourly rollup: cheap over long ranges, and still there after the raw TTL has expired.
-- source: rollup
-- default_by: model
-- default_limit: 1000
WITH
    quantilesTDigestMerge(0.5, 0.9, 0.99)(duration_ms_digest)  AS duration_ms_q,
    quantilesTDigestMerge(0.5, 0.9, 0.99)(total_tokens_digest) AS total_tokens_q
SELECT
    {{select}}
    sum(requests) AS requests,
    round(sum(usage_hourly.duration_ns) / greatest(sum(usage_hourly.requests), 1) / 1e6, 1) AS avg_duration_ms,
    round(duration_ms_q[1], 1) AS duration_ms_p50,
    round(duration_ms_q[2], 1) AS duration_ms_p90,
    round(duration_ms_q[3], 1) AS duration_ms_p99,
    round(total_tokens_q[1])   AS total_tokens_p50,
    round(total_tokens_q[2])   AS total_tokens_p90,
    round(total_tokens_q[3])   AS total_tokens_p99
FROM usage_hourly
WHERE hour >= toStartOfHour({since:DateTime64(9, 'UTC')})
  AND hour < {until:DateTime64(9, 'UTC')}
  {{where}}
GROUP BY {{group_by}}
ORDER BY requests DESC{{order_by}}
LIMIT {limit:UInt64}
