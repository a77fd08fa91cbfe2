"""The grpcio transport (`grpc.transport: grpcio`): the same sessions, driven by grpc.aio.

Kept apart from the h2 transport so that importing the h2 hot path never imports grpcio
(tests/test_transport_imports.py). Also the client stub tests and tools use to talk to the
sidecar as Envoy would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import grpc

from extproc._pb.ext_proc_wire_pb2 import ProcessingRequest, ProcessingResponse
from extproc.transport.session import Metadata, SessionFactory

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD_PATH = f"/{SERVICE_NAME}/Process"

if TYPE_CHECKING:  # grpc.aio.ServicerContext is generic in the stubs only
    from typing import TypeAlias

    Handler: TypeAlias = Callable[[AsyncIterator[ProcessingRequest], grpc.aio.ServicerContext[Any, Any]],
                                  AsyncIterator[ProcessingResponse]]


def session_handler(sessions: SessionFactory) -> Handler:
    """A grpc.aio stream handler running each stream through a session from `sessions`."""

    async def process(requests: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[ProcessingResponse]:
        session = sessions(_metadata(context))
        try:
            async for req in requests:
                resp = session.on_message(req)
                if resp is not None and not isinstance(resp, ProcessingResponse):
                    resp = await cast("asyncio.Future[ProcessingResponse | None]", resp)
                if resp is not None:
                    yield resp
                if session.finished:
                    # Close our side now: in observability mode Envoy would otherwise hold the
                    # stream open until deferred_close_timeout.
                    break
        finally:
            session.close()

    return process


def generic_handler(process: Handler) -> grpc.GenericRpcHandler:
    """Register `process` under Envoy's service name (our messages live in our own proto package)."""
    method = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=ProcessingRequest.FromString,
        response_serializer=ProcessingResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": method})


def client_stub(channel: grpc.aio.Channel) -> Any:
    """A Process() callable for tests and tools that talk to the sidecar as Envoy would."""
    return channel.stream_stream(
        METHOD_PATH,
        request_serializer=ProcessingRequest.SerializeToString,
        response_deserializer=ProcessingResponse.FromString,
    )


async def start_grpc_server(sessions: SessionFactory, listen: str,
                            reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """Bind `listen` (host:port or unix:/path); `reuse_port`: SO_REUSEPORT, the port shared with
    sibling worker processes. Returns the server and the bound port (0 for unix)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    server.add_generic_rpc_handlers((generic_handler(session_handler(sessions)),))
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot bind gRPC listener {listen}")
    await server.start()
    return server, port


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Metadata:
    try:
        raw: Iterable[tuple[str, Any]] = context.invocation_metadata() or ()
    except Exception:  # a context without metadata support
        return ()
    return tuple((k, v if isinstance(v, str) else v.decode("utf-8", "replace")) for k, v in raw)
