-- Each GPU pool's cost per hour and capacity, from the pricing file (`gpu_pools:`), by the
-- time each rate takes effect. Written by the sidecar at start and by `extproc reprice`
-- (replaced as a whole: the file is the source of truth); the chargeback and gpu_pools reports
-- join it to allocate each pool-hour's cost to the requests by their GPU work.
CREATE TABLE IF NOT EXISTS gpu_pool_rates
(
    pool                LowCardinality(String),
    since               DateTime64(9, 'UTC'),
    hour_cost_micros    Int64,
    capacity_work_milli UInt64,
    -- the pool's first rate has a `from` date: its cost counts from then, traffic or not,
    -- otherwise from the first hour the pool served a request
    explicit_start      Bool,
    loaded_at           DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (pool, since);
