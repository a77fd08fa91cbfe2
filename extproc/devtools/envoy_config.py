"""Render the Envoy bootstrap that fronts vLLM with our ext_proc filter.

The choices that matter, and why:
- request body BUFFERED: we may rewrite it (stream_options.include_usage) and must send a
  correct content-length; the listener's buffer limit is raised so long prompts fit.
- response body STREAMED: tokens reach the client as they are generated; we see every chunk.
- response headers SKIP: one message (and round trip) less per request. The status arrives as
  the response.code attribute with the first body message; the body shows SSE or JSON.
- allow_mode_override: requests we do not meter skip body processing entirely.
- failure_mode_allow: a sidecar outage must not take inference down. Lost metering is not
  hidden: Envoy counts it (ext_proc streams_failed / failure_mode_allowed stats) and so do we.
- message_timeout: 1 s rather than the 200 ms default, so a GC pause or a burst on a shared
  core does not turn into a skipped chunk.
- observe mode: Envoy sends everything without waiting for answers ("send and go").
  The sidecar closes each stream at end of response, deferred_close_timeout is short and the
  circuit breakers are sized, or streams pile up (see README).
- hybrid mode: two ext_proc filters on one sidecar. The first is synchronous for the request
  (headers and body: attribution, usage injection, and later budgets can answer before the
  upstream is called); the second observes the response in observability mode, off the
  latency path. The gRPC metadata `x-extproc-role` tells the sidecar which stream is which, and
  a header the first filter adds to the request pairs them.
- paths normalized before any filter: the sidecar meters by the path the upstream routes on, so
  the two must see the same one. vLLM's ASGI server percent-decodes the path (so
  /v1/chat%2Fcompletions reaches the chat handler); Envoy decodes it the same way before the
  sidecar and the upstream see it (UNESCAPE_AND_FORWARD: what vLLM would serve still works,
  metered), resolves dot segments (normalize_path) and merges slashes, so no spelling of a route
  reaches the model under a path the sidecar reads as another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml

from extproc.exchange import ROLE_METADATA

MODES = ("sync", "observe", "hybrid")


@dataclass
class EnvoyOptions:
    upstream: str = "http://127.0.0.1:8000"
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 9901
    extproc_address: str = "127.0.0.1:50051"  # host:port or unix:/path
    mode: str = "sync"
    with_extproc: bool = True
    buffer_limit_bytes: int = 8 * 1024 * 1024
    message_timeout_ms: int = 1000
    failure_mode_allow: bool = True
    route_timeout_s: int = 600
    # non-empty: Envoy answers this path itself (health_check filter: 200, or 503 once told
    # POST /healthcheck/fail while draining), for a readiness probe on the listener port: the
    # admin address stays on loopback
    health_check_path: str = ""


def _socket_address(address: str) -> dict[str, Any]:
    if address.startswith("unix:"):
        return {"pipe": {"path": address[len("unix:"):]}}
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _upstream_cluster(upstream: str) -> dict[str, Any]:
    url = urlparse(upstream)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"upstream must be an http(s) URL, got {upstream!r}")
    port = url.port or (443 if url.scheme == "https" else 80)
    cluster: dict[str, Any] = {
        "name": "vllm",
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": "vllm",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": url.hostname, "port_value": port}}}}]}],
        },
        # Many concurrent long-lived streams are normal for an inference server.
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                             "max_requests": 100000}]},
    }
    if url.scheme == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": url.hostname,
            },
        }
    return cluster


def _ext_proc_config(opts: EnvoyOptions, *, observe: bool, request: bool, response: bool,
                     role: str | None = None) -> dict[str, Any]:
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "30s"}
    if role:
        grpc_service["initial_metadata"] = [{"key": ROLE_METADATA, "value": role}]
    cfg: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": grpc_service,
        "failure_mode_allow": opts.failure_mode_allow,
        "allow_mode_override": True,
        "message_timeout": f"{opts.message_timeout_ms / 1000:g}s",
        "processing_mode": {
            "request_header_mode": "SEND",
            # Response headers cost a message (a round trip when synchronous) and tell us only
            # the status, which comes as an attribute with the first body message instead, and
            # the content type, which the body shows (SSE or JSON).
            "response_header_mode": "SKIP",
            # Observability mode supports STREAMED only; it cannot rewrite the request anyway.
            "request_body_mode": ("STREAMED" if observe else "BUFFERED") if request else "NONE",
            "response_body_mode": "STREAMED" if response else "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    if response:
        cfg["response_attributes"] = ["response.code"]
    if observe:
        cfg["observability_mode"] = True
        cfg["deferred_close_timeout"] = "1s"
    return cfg


def _ext_proc_filters(opts: EnvoyOptions) -> list[dict[str, Any]]:
    if opts.mode == "hybrid":
        return [
            {"name": "envoy.filters.http.ext_proc",
             "typed_config": _ext_proc_config(opts, observe=False, request=True, response=False, role="request")},
            {"name": "extproc.response",
             "typed_config": _ext_proc_config(opts, observe=True, request=False, response=True, role="response")},
        ]
    observe = opts.mode == "observe"
    return [{"name": "envoy.filters.http.ext_proc",
             "typed_config": _ext_proc_config(opts, observe=observe, request=True, response=True)}]


def _health_check_filters(path: str) -> list[dict[str, Any]]:
    if not path:
        return []
    if not path.startswith("/"):
        raise ValueError(f"health_check_path must start with '/', got {path!r}")
    return [{"name": "envoy.filters.http.health_check", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
        "pass_through_mode": False,
        "headers": [{"name": ":path", "string_match": {"exact": path}}],
    }}]


def render(opts: EnvoyOptions) -> dict[str, Any]:
    if opts.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    filters = _health_check_filters(opts.health_check_path)
    filters += _ext_proc_filters(opts) if opts.with_extproc else []
    filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "generate_request_id": True,
        "stream_idle_timeout": "300s",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        "route_config": {
            "name": "vllm",
            "virtual_hosts": [{
                "name": "vllm",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                            "route": {"cluster": "vllm", "timeout": f"{opts.route_timeout_s}s"}}],
            }],
        },
        "http_filters": filters,
    }
    clusters = [_upstream_cluster(opts.upstream)]
    if opts.with_extproc:
        clusters.append({
            "name": "extproc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            # One gRPC stream per HTTP request: the default 1024 would cap concurrency.
            "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                                 "max_requests": 100000}]},
            "load_assignment": {
                "cluster_name": "extproc",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(opts.extproc_address)}}]}],
            },
        })
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": opts.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": opts.listen_host, "port_value": opts.listen_port}},
                "per_connection_buffer_limit_bytes": opts.buffer_limit_bytes,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": clusters,
        },
    }


def render_yaml(opts: EnvoyOptions) -> str:
    return yaml.safe_dump(render(opts), sort_keys=False)
