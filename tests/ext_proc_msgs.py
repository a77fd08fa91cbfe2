"""Build ext_proc messages the way Envoy sends them, for tests that skip Envoy."""

from __future__ import annotations

from extproc._pb import ext_proc_wire_pb2 as pb


def headers(pairs: dict[str, str], *, response: bool = False, eos: bool = False, raw: bool = True) -> pb.ProcessingRequest:
    hm = pb.HeaderMap(headers=[
        pb.HeaderValue(key=k, raw_value=v.encode()) if raw else pb.HeaderValue(key=k, value=v)
        for k, v in pairs.items()
    ])
    hh = pb.HttpHeaders(headers=hm, end_of_stream=eos)
    return pb.ProcessingRequest(response_headers=hh) if response else pb.ProcessingRequest(request_headers=hh)


def body(data: bytes, *, response: bool = False, eos: bool = False, code: int | None = None,
         filter_name: str = "envoy.filters.http.ext_proc") -> pb.ProcessingRequest:
    """code: the response.code attribute Envoy attaches to the first response body message when
    response headers are skipped."""
    b = pb.HttpBody(body=data, end_of_stream=eos)
    req = pb.ProcessingRequest(response_body=b) if response else pb.ProcessingRequest(request_body=b)
    if code is not None:
        req.attributes[filter_name].fields["response.code"].number_value = code
    return req


def request_headers(path: str = "/v1/chat/completions", method: str = "POST", **extra: str) -> pb.ProcessingRequest:
    pairs = {":method": method, ":path": path, ":authority": "test", "x-request-id": "rid-1"}
    pairs.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers(pairs)


def response_headers(status: int = 200, content_type: str = "text/event-stream") -> pb.ProcessingRequest:
    return headers({":status": str(status), "content-type": content_type}, response=True)


def sse(*objs: bytes | str) -> bytes:
    out = b""
    for o in objs:
        data = o if isinstance(o, bytes) else o.encode()
        out += b"data: " + data + b"\n\n"
    return out
