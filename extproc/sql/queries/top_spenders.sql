-- The label values (users by default) that used the most tokens, from the raw table.
-- source: raw
-- default_by: user
-- default_limit: 10
SELECT
    {{select}}
    count()                        AS requests,
    sum(prompt_tokens)             AS prompt_tokens,
    sum(completion_tokens)         AS completion_tokens,
    sum(total_tokens)              AS total_tokens,
    round(avg(usage_events.total_tokens), 1) AS avg_tokens_per_request,
    toDecimal64(sum(list_cost_micros), 6) / 1000000 AS cost_usd,
    countIf(metered AND price_status != 'priced') AS unpriced_requests
FROM usage_events
WHERE start_time >= {since:DateTime64(9, 'UTC')}
  AND start_time < {until:DateTime64(9, 'UTC')}
  {{where}}
GROUP BY {{group_by}}
ORDER BY total_tokens DESC, requests DESC{{order_by}}
LIMIT {limit:UInt64}
