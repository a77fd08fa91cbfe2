"""ext_proc protocol details: message types, header decoding, response builders.

Everything that knows Envoy's ext_proc message layout lives here, so processors deal in plain
dicts and bytes.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from extproc._pb import ext_proc_wire_pb2 as pb

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
ProcessingMode = pb.ProcessingMode
# what a ProcessingRequest's `request` oneof holds
Message = pb.HttpHeaders | pb.HttpBody | pb.HttpTrailers

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD_PATH = f"/{SERVICE_NAME}/Process"

REQUEST_HEADERS = "request_headers"
REQUEST_BODY = "request_body"
RESPONSE_HEADERS = "response_headers"
RESPONSE_BODY = "response_body"
REQUEST_TRAILERS = "request_trailers"
RESPONSE_TRAILERS = "response_trailers"


def decode_headers(header_map: pb.HeaderMap, wanted: frozenset[str]) -> dict[str, str]:
    """Envoy sends either `value` or `raw_value` (runtime guard send_header_raw_value).

    Only the `wanted` keys are decoded (clients send a dozen headers we never read); repeated
    headers keep their first value, as our labels are single-valued."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        key = h.key
        if key in wanted and key not in out:
            raw = h.raw_value
            out[key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


# Responses are immutable singletons where nothing varies: one allocation per process.
_CONTINUE = {
    REQUEST_HEADERS: ProcessingResponse(request_headers=pb.HeadersResponse()),
    RESPONSE_HEADERS: ProcessingResponse(response_headers=pb.HeadersResponse()),
    REQUEST_BODY: ProcessingResponse(request_body=pb.BodyResponse()),
    RESPONSE_BODY: ProcessingResponse(response_body=pb.BodyResponse()),
    REQUEST_TRAILERS: ProcessingResponse(request_trailers=pb.TrailersResponse()),
    RESPONSE_TRAILERS: ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def continue_response(kind: str) -> ProcessingResponse:
    return _CONTINUE[kind]


def response_code(req: ProcessingRequest) -> int | None:
    """The upstream status Envoy attached as the response.code attribute (sent with the first
    response body message when response headers are not sent to us), if any."""
    for attrs in req.attributes.values():  # keyed by filter name
        value = attrs.fields.get("response.code")
        if value is not None and value.WhichOneof("kind") == "number_value":
            return int(value.number_value)
    return None


def skip_bodies_response(response_headers: bool = True) -> ProcessingResponse:
    """Answer request headers and tell Envoy to send no bodies for this request (needs
    allow_mode_override); response headers still come, for the status, unless this filter
    does not see responses at all."""
    mode = ProcessingMode(request_body_mode=ProcessingMode.NONE, response_body_mode=ProcessingMode.NONE)
    mode.response_header_mode = ProcessingMode.SEND if response_headers else ProcessingMode.SKIP
    return ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=mode)


def add_request_header_response(key: str, value: str) -> ProcessingResponse:
    """Answer request headers by adding one header (seen by later filters and the upstream)."""
    option = pb.HeaderValueOption(
        header=pb.HeaderValue(key=key, raw_value=value.encode()),
        append_action=pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    return ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[option]))
        )
    )


def with_request_header_mutation(resp: ProcessingResponse, set_headers: dict[str, str],
                                 remove: tuple[str, ...] = ()) -> ProcessingResponse:
    """A copy of a request-headers answer that also sets and removes headers on the request
    (the shared singletons are never changed; the plain CONTINUE's copy is made once)."""
    if resp is _CONTINUE[REQUEST_HEADERS]:
        return _continue_with_mutation(tuple(set_headers.items()), remove)
    return _mutated(resp, set_headers, remove)


@functools.cache
def _continue_with_mutation(set_headers: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> ProcessingResponse:
    return _mutated(_CONTINUE[REQUEST_HEADERS], dict(set_headers), remove)


def _mutated(resp: ProcessingResponse, set_headers: dict[str, str], remove: tuple[str, ...]) -> ProcessingResponse:
    out = ProcessingResponse()
    out.CopyFrom(resp)
    mutation = out.request_headers.response.header_mutation
    for k, v in set_headers.items():
        mutation.set_headers.append(pb.HeaderValueOption(
            header=pb.HeaderValue(key=k, raw_value=v.encode()),
            append_action=pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    mutation.remove_headers.extend(h for h in remove if h not in set_headers)
    return out


def replace_request_body(body: bytes) -> ProcessingResponse:
    """BUFFERED request body replaced whole; content-length must follow the new size."""
    length = pb.HeaderValueOption(
        header=pb.HeaderValue(key="content-length", raw_value=str(len(body)).encode()),
        append_action=pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    return ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=[length]),
                body_mutation=pb.BodyMutation(body=body),
            )
        )
    )


def replace_response_chunk(body: bytes) -> ProcessingResponse:
    """STREAMED response body: replace this chunk (empty bytes clears it)."""
    mutation = pb.BodyMutation(body=body) if body else pb.BodyMutation(clear_body=True)
    return ProcessingResponse(
        response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
    )


def immediate_error(status: int, message: str, *, error_type: str, code: str | None = None,
                    headers: dict[str, str] | None = None) -> ProcessingResponse:
    """Envoy answers the client itself (the request never reaches the upstream), with an error
    body in OpenAI's shape, which the official SDKs turn into their typed exceptions."""
    body = orjson.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    options = [
        pb.HeaderValueOption(header=pb.HeaderValue(key=k, raw_value=v.encode()),
                             append_action=pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        for k, v in {"content-type": "application/json", **(headers or {})}.items()
    ]
    return ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=pb.HttpStatus(code=status), headers=pb.HeaderMutation(set_headers=options), body=body,
        details=f"extproc_{error_type}"))


def strip_content_length_response() -> ProcessingResponse:
    """Response headers answer for a response whose body we will rewrite: its length changes."""
    return ProcessingResponse(
        response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(remove_headers=["content-length"]))
        )
    )


def __getattr__(name: str) -> Any:
    """generic_handler and client_stub moved to extproc.transport.grpcio_server (so that this
    module, on the h2 hot path, does not import grpcio); still importable from here."""
    if name in ("generic_handler", "client_stub"):
        from extproc.transport import grpcio_server

        return getattr(grpcio_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
