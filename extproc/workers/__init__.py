"""Worker processes (`grpc.workers` > 1).

Why processes: one Python process serves ext_proc on at most one core (the GIL). Why the parent
keeps every sink: embedded ClickHouse (chDB) lets one process open a data directory, the spool
is one sequence on disk, and the admin API and Prometheus endpoint are one each.

Connections: Envoy opens few (one per Envoy worker thread) and keeps them, so how they are
spread decides the balance. With the h2 transport the parent accepts and hands each connection
(SCM_RIGHTS) to the worker with the fewest open; grpcio cannot serve a socket it did not accept,
so its workers bind the port with SO_REUSEPORT and the kernel hashes connections to them (two
connections over two workers share one worker half the time).

A worker is `python -m extproc.workers --fd N --index I [--conn-fd M]` (worker.py), spawned (not
forked: the parent runs threads and ClickHouse) by the pool (pool.py) with one end of a
socketpair (and one for connections); its settings arrive over that socket. Events and counter
snapshots go up (extproc/workers/relay.py), flush barriers go both ways. A worker that dies is started
again (its open streams fail open in Envoy); a worker whose parent dies stops by itself.
"""

from extproc.workers.pool import WorkerPool

__all__ = ["WorkerPool"]
