-- Requests, tokens and money per chargeback key, from the hourly rollup (hour granularity:
-- every hour bucket that overlaps [since, until) counts). cost_usd: list prices (exact sums of
-- each event's integer micro-USD); unpriced_requests: metered requests without a list price;
-- gpu_cost_usd: each pool-hour's cost allocated by GPU work, cost x work / max(capacity, the
-- pool's work that hour), summed exactly and rounded to the micro-dollar (README "Pricing").
-- source: rollup
-- default_by: team
-- default_limit: 1000
--
-- Template (filled by extproc/storage/reports.py, never with user text):
--   {{select}} / {{group_by}} / {{order_by}}: whitelisted dimension expressions;
--   {{where}}: "AND <dimension> = {f_<n>:String}" per filter, values bound server-side.
SELECT
    {{select}}
    sum(requests)          AS requests,
    sum(prompt_tokens)     AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens,
    sum(cached_tokens)     AS cached_tokens,
    sum(reasoning_tokens)  AS reasoning_tokens,
    sum(total_tokens)      AS total_tokens,
    sum(errors)            AS errors,
    sum(client_aborted)    AS client_aborted,
    toDecimal64(sum(list_cost_micros), 6) / 1000000 AS cost_usd,
    sum(unpriced)          AS unpriced_requests,
    toDecimal64(round(sum(gpu_micros), 0), 6) / 1000000 AS gpu_cost_usd
FROM (
    SELECT
        u.team AS team, u.feature AS feature, u.model AS model, u.endpoint AS endpoint,
        u.gpu_pool AS gpu_pool, u.hour AS hour,
        u.requests AS requests, u.prompt_tokens AS prompt_tokens,
        u.completion_tokens AS completion_tokens, u.cached_tokens AS cached_tokens,
        u.reasoning_tokens AS reasoning_tokens, u.total_tokens AS total_tokens,
        u.errors AS errors, u.client_aborted AS client_aborted,
        u.list_cost_micros AS list_cost_micros,
        -- rows from before pricing existed count as unpriced
        u.requests - u.priced_requests - u.unmetered_requests AS unpriced,
        if(r.capacity_work_milli > 0 AND u.gpu_pool != '',
           toDecimal128(r.hour_cost_micros, 6) * u.gpu_work_milli
               / greatest(r.capacity_work_milli, pw.pool_work_milli),
           toDecimal128(0, 6)) AS gpu_micros
    FROM usage_hourly AS u
    LEFT JOIN (
        SELECT gpu_pool, hour, sum(gpu_work_milli) AS pool_work_milli
        FROM usage_hourly
        WHERE hour >= toStartOfHour({since:DateTime64(9, 'UTC')})
          AND hour < {until:DateTime64(9, 'UTC')} AND gpu_pool != ''
        GROUP BY gpu_pool, hour
    ) AS pw ON pw.gpu_pool = u.gpu_pool AND pw.hour = u.hour
    ASOF LEFT JOIN gpu_pool_rates AS r
        ON r.pool = u.gpu_pool AND toDateTime64(u.hour, 9, 'UTC') >= r.since
    WHERE u.hour >= toStartOfHour({since:DateTime64(9, 'UTC')})
      AND u.hour < {until:DateTime64(9, 'UTC')}
)
WHERE 1
  {{where}}
GROUP BY {{group_by}}
ORDER BY total_tokens DESC, requests DESC{{order_by}}
LIMIT {limit:UInt64}
