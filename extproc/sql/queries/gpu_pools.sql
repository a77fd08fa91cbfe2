-- What each GPU pool cost, how much of it the requests used (allocated_usd, the sum of the
-- gpu_cost_usd of chargeback) and what nobody used (idle_usd), per pool-hour from the hourly
-- rollup and the pools' rates (gpu_pool_rates). Every hour of [since, until) up to the current
-- hour counts, traffic or not, from the pool's `from` date (else its first request):
-- idle = hour cost x max(0, 1 - work / capacity).
-- source: pools
-- default_by: pool
-- default_limit: 1000
WITH
    first_use AS (
        SELECT gpu_pool AS pool, min(hour) AS first_hour
        FROM usage_hourly WHERE gpu_pool != '' GROUP BY gpu_pool
    ),
    spans AS (
        SELECT s.pool AS pool,
               greatest(toStartOfHour({since:DateTime64(9, 'UTC')}),
                        if(s.explicit, toStartOfHour(s.first_since), f.first_hour)) AS start,
               least(toDateTime({until:DateTime64(9, 'UTC')}, 'UTC'), toStartOfHour(now('UTC')) + toIntervalHour(1)) AS stop
        FROM (SELECT pool, min(since) AS first_since, max(explicit_start) AS explicit
              FROM gpu_pool_rates GROUP BY pool) AS s
        LEFT JOIN first_use AS f ON f.pool = s.pool
        WHERE s.explicit OR f.pool != ''
    ),
    pool_hours AS (
        SELECT pool, arrayJoin(arrayMap(i -> start + toIntervalHour(i),
               range(toUInt64(greatest(intDiv(toUnixTimestamp(stop) - toUnixTimestamp(start) + 3599, 3600), 0))))) AS hour
        FROM spans
    )
SELECT
    {{select}}
    count() AS pool_hours,
    toDecimal64(sum(hour_cost_micros), 6) / 1000000 AS pool_cost_usd,
    toDecimal64(round(sum(used_micros), 0), 6) / 1000000 AS allocated_usd,
    toDecimal64(sum(hour_cost_micros) - round(sum(used_micros), 0), 6) / 1000000 AS idle_usd,
    round(sum(work_milli) / greatest(sum(capacity_work_milli), 1), 4) AS utilization
FROM (
    SELECT
        ph.pool AS pool, ph.hour AS hour, r.hour_cost_micros AS hour_cost_micros,
        r.capacity_work_milli AS capacity_work_milli, w.work_milli AS work_milli,
        if(r.capacity_work_milli > 0,
           toDecimal128(r.hour_cost_micros, 6) * least(w.work_milli, r.capacity_work_milli) / r.capacity_work_milli,
           toDecimal128(0, 6)) AS used_micros
    FROM pool_hours AS ph
    ASOF LEFT JOIN gpu_pool_rates AS r ON r.pool = ph.pool AND toDateTime64(ph.hour, 9, 'UTC') >= r.since
    LEFT JOIN (
        SELECT gpu_pool, hour, sum(gpu_work_milli) AS work_milli
        FROM usage_hourly
        WHERE gpu_pool != '' AND hour >= toStartOfHour({since:DateTime64(9, 'UTC')})
          AND hour < {until:DateTime64(9, 'UTC')}
        GROUP BY gpu_pool, hour
    ) AS w ON w.gpu_pool = ph.pool AND w.hour = ph.hour
    WHERE r.capacity_work_milli > 0
)
WHERE 1
  {{where}}
GROUP BY {{group_by}}
ORDER BY pool_cost_usd DESC{{order_by}}
LIMIT {limit:UInt64}
