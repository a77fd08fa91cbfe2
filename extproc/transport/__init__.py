"""gRPC server transports for the ext_proc stream. grpcio (extproc.server.start_grpc_server) is
the default; `grpc.transport: h2` selects the lean HTTP/2 server here."""

from extproc.transport.h2server import H2GrpcServer, start_h2_server
from extproc.transport.stream import StreamContext

__all__ = ["H2GrpcServer", "StreamContext", "start_h2_server"]
