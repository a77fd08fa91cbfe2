-- Requests and tokens per chargeback key, from the hourly rollup (hour granularity: every
-- hour bucket that overlaps [since, until) counts).
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
    sum(client_aborted)    AS client_aborted
FROM usage_hourly
WHERE hour >= toStartOfHour({since:DateTime64(9, 'UTC')})
  AND hour < {until:DateTime64(9, 'UTC')}
  {{where}}
GROUP BY {{group_by}}
ORDER BY total_tokens DESC, requests DESC{{order_by}}
LIMIT {limit:UInt64}
