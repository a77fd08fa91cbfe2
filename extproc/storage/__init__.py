"""ClickHouse pipeline: batched, durable (spool), deduplicated inserts; rollups; reports.

    storage = await open_storage(settings)      # client + migrations, on its own thread
    sink = storage.sink()                       # BatchProcessor, an extproc.events.EventSink
    await sink.start()                          # replays what a crashed run left in the spool
    sink.emit(event)                            # never blocks, never raises
    rows = await storage.report("chargeback", by=["team", "day"])
    await storage.close()                       # shuts the sink down first

Modules, in the order an event passes them:
    batcher.py        BatchProcessor: emit(), start/flush/shutdown, the worker loop
    batch_source.py   batches in seq order: replays, the memory queue, the spool after overflow
    delivery.py       inserting a batch until stored: pipelining, retries, isolating bad rows
    sink.py           the writer protocols and the ClickHouse writer (dedup tokens)
    spool.py          the write-ahead log's writer (seqs, segments, syncing), facade for:
    spool_records.py  segment files: record format, creation, recovery of one file
    spool_manifest.py batches handed to ClickHouse and the acknowledged end
    spool_reader.py   reading written records back in order
    dead_letters.py   what ClickHouse rejected and what recovery found corrupt
    pbinput.py, columns.py, decode.py   the two insert formats (Protobuf, Arrow)
    client.py, store.py, migrations.py, reports.py   connection, wiring, DDL, report queries
    ratelog.py        at most one log line per key every 10 s (per-event paths)
Nothing here imports the transport or the metering code; emit() takes one lock and does no
file I/O under it.
"""

from extproc.storage.batcher import BatchProcessor
from extproc.storage.reports import FORMATS, REPORTS, ReportError, format_rows
from extproc.storage.store import Storage, open_storage, open_storage_sync

__all__ = [
    "FORMATS",
    "REPORTS",
    "BatchProcessor",
    "ReportError",
    "Storage",
    "format_rows",
    "open_storage",
    "open_storage_sync",
]
