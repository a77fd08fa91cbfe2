"""Every Envoy config we ship or render passes the real Envoy's validation, and its typed form
(envoy-data-plane's Bootstrap) says what we mean."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.devtools.devstack import envoy_binary
from extproc.devtools.envoy_config import EnvoyOptions, render_yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "envoy").glob("*.yaml"))

for _m in ("network.http_connection_manager", "http.ext_proc", "http.router"):
    importlib.import_module(f"envoy_data_plane.envoy.extensions.filters.{_m}.v3")
importlib.import_module("envoy_data_plane.envoy.extensions.upstreams.http.v3")
importlib.import_module("envoy_data_plane.envoy.extensions.transport_sockets.tls.v3")
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap  # noqa: E402

RENDERED = {
    "sync-tcp": EnvoyOptions(),
    "observe-unix": EnvoyOptions(mode="observe", extproc_address="unix:/tmp/extproc.sock"),
    "https-upstream": EnvoyOptions(upstream="https://vllm.example.internal"),
    "no-extproc": EnvoyOptions(with_extproc=False),
    "hybrid": EnvoyOptions(mode="hybrid"),
}


def _validate(path: Path) -> None:
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr


def _ext_proc(text: str):
    boot = Bootstrap.from_dict(yaml.safe_load(text))
    hcm = boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.unpack()
    filters = [f.typed_config.unpack() for f in hcm.http_filters]
    return boot, filters


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"envoy.yaml", "envoy-observe.yaml", "envoy-hybrid.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    _validate(path)


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_config_validates(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(render_yaml(RENDERED[name]))
    _validate(path)


@pytest.mark.parametrize("path", [p for p in SHIPPED if "hybrid" not in p.name], ids=lambda p: p.name)
def test_typed_ext_proc_settings(path):
    boot, filters = _ext_proc(path.read_text())
    ext = filters[0]
    assert type(ext).__name__ == "ExternalProcessor"
    assert ext.allow_mode_override and ext.failure_mode_allow
    mode = ext.processing_mode
    observe = "observe" in path.name
    want = ("STREAMED" if observe else "BUFFERED", "STREAMED")
    assert (mode.request_body_mode.name, mode.response_body_mode.name) == want
    # the status comes as an attribute with the first body message: no response headers message
    assert mode.response_header_mode.name == "SKIP" and list(ext.response_attributes) == ["response.code"]
    assert ext.observability_mode == observe
    extproc = next(c for c in boot.static_resources.clusters if c.name == "extproc")
    opts = extproc.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].unpack()
    assert opts.explicit_http_config.http2_protocol_options is not None
    assert boot.static_resources.listeners[0].per_connection_buffer_limit_bytes >= 1 << 20


def test_shipped_configs_match_the_renderer():
    """envoy/*.yaml are generated; a hand edit would drift from what `extproc dev` runs."""
    up = "http://vllm.inference.svc:8000"
    for path, mode in ((ROOT / "envoy/envoy.yaml", "sync"), (ROOT / "envoy/envoy-observe.yaml", "observe"),
                       (ROOT / "envoy/envoy-hybrid.yaml", "hybrid")):
        body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
        want = render_yaml(EnvoyOptions(upstream=up, listen_host="0.0.0.0", mode=mode))
        assert yaml.safe_load(body) == yaml.safe_load(want), path.name


def test_bad_upstream_is_refused():
    with pytest.raises(ValueError, match="http"):
        render_yaml(EnvoyOptions(upstream="vllm:8000"))


def test_hybrid_has_a_sync_request_filter_and_an_observing_response_filter():
    _, filters = _ext_proc(render_yaml(EnvoyOptions(mode="hybrid")))
    req, resp = filters[0], filters[1]
    assert not req.observability_mode and resp.observability_mode
    assert req.processing_mode.request_body_mode.name == "BUFFERED"
    assert req.processing_mode.response_header_mode.name == "SKIP"
    assert resp.processing_mode.request_body_mode.name == "NONE"
    assert resp.processing_mode.response_body_mode.name == "STREAMED"
    roles = [f.grpc_service.initial_metadata[0].value for f in (req, resp)]
    assert roles == ["request", "response"]
