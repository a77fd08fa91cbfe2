"""ClickHouse pipeline: batched, durable (spool), deduplicated inserts; rollups; reports.

    storage = await open_storage(settings)      # client + migrations, on its own thread
    sink = storage.sink()                       # BatchProcessor, an extproc.events.EventSink
    await sink.start()                          # replays what a crashed run left in the spool
    sink.emit(event)                            # never blocks, never raises
    rows = await storage.report("chargeback", by=["team", "day"])
    await storage.close()                       # shuts the sink down first
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
