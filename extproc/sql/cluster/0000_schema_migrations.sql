-- ON CLUSTER / Replicated variant of ../migrations/0000_schema_migrations.sql (see ../README.md).
-- Bookkeeping for extproc's own migrations. Re-run before every migrate (IF NOT EXISTS), so it
-- is the one file that is never recorded. ReplacingMergeTree: two sidecars migrating at once
-- may both record a version; readers use DISTINCT.
CREATE TABLE IF NOT EXISTS schema_migrations ON CLUSTER '{cluster}'
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/schema_migrations', '{replica}', applied_at)
ORDER BY version;
