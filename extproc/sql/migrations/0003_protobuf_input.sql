-- Inserts arrive in ClickHouse's Protobuf input format: the sidecar's spool records (serialized
-- extproc.usage.v1.UsageEvent) go to ClickHouse as they are and ClickHouse parses them, instead
-- of the sidecar decoding them and building Arrow columns in Python (see README, "Performance").
-- Protobuf fields match columns by name; the two times arrive as the proto's unix-nanosecond
-- integers, held by EPHEMERAL columns (never stored) from which the DateTime64 columns are
-- computed. A time of 0 (an event built without one) falls back to the other time, then to now.
ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS start_time_unix_nano Int64 EPHEMERAL,
    ADD COLUMN IF NOT EXISTS end_time_unix_nano Int64 EPHEMERAL;

ALTER TABLE usage_events
    MODIFY COLUMN start_time DateTime64(9, 'UTC') DEFAULT fromUnixTimestamp64Nano(
        if(start_time_unix_nano > 0, start_time_unix_nano,
           if(end_time_unix_nano > 0, end_time_unix_nano, toUnixTimestamp64Nano(now64(9)))), 'UTC')
        CODEC(Delta, ZSTD(1)),
    MODIFY COLUMN end_time DateTime64(9, 'UTC') DEFAULT fromUnixTimestamp64Nano(
        if(end_time_unix_nano > 0, end_time_unix_nano,
           if(start_time_unix_nano > 0, start_time_unix_nano, toUnixTimestamp64Nano(now64(9)))), 'UTC')
        CODEC(Delta, ZSTD(1));
