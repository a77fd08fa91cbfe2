"""gRPC server transports for the ext_proc stream; each serves sessions
(extproc.transport.session) from the service.

- h2conn: the sans-IO HTTP/2 + gRPC connection core (bytes in, bytes out); h2server: its
  asyncio glue and listener (`grpc.transport: h2`, the default). Neither imports grpcio.
- grpcio_server: the same sessions on grpc.aio (`grpc.transport: grpcio`), and a client stub.

May import extproc._pb and nothing else of extproc outside this package.
"""

from extproc.transport.h2server import H2GrpcServer, start_h2_server
from extproc.transport.session import Session, SessionFactory

__all__ = ["H2GrpcServer", "Session", "SessionFactory", "start_h2_server"]
