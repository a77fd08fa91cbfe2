"""Our ext_proc subset must match Envoy's published protos field for field.

xds-protos is installed by the Makefile into an isolated directory (XDS_REF_PATH), never into the
venv: it would overwrite opentelemetry-proto's files. The comparison runs in a subprocess so the
two descriptor sets never meet in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# our message -> Envoy's full name
PAIRS = {
    "HeaderValue": "envoy.config.core.v3.HeaderValue",
    "HeaderMap": "envoy.config.core.v3.HeaderMap",
    "HeaderValueOption": "envoy.config.core.v3.HeaderValueOption",
    "HttpStatus": "envoy.type.v3.HttpStatus",
    "ProcessingMode": "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode",
    **{n: f"envoy.service.ext_proc.v3.{n}" for n in (
        "ProtocolConfiguration", "HttpHeaders", "HttpBody", "HttpTrailers", "ProcessingRequest",
        "HeaderMutation", "StreamedBodyResponse", "BodyMutation", "CommonResponse", "HeadersResponse",
        "BodyResponse", "TrailersResponse", "GrpcStatus", "ImmediateResponse", "ProcessingResponse")},
}

DUMP = r"""
import json, sys
from google.protobuf import descriptor_pool
names = json.loads(sys.argv[1])
if sys.argv[2] == "envoy":
    import envoy.service.ext_proc.v3.external_processor_pb2 as ep  # noqa
    import envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2  # noqa
    svc = ep.DESCRIPTOR.services_by_name["ExternalProcessor"]
    service = [svc.full_name, [(m.name, m.client_streaming, m.server_streaming) for m in svc.methods]]
else:
    import extproc._pb.ext_proc_wire_pb2 as ep  # noqa
    svc = ep.DESCRIPTOR.services_by_name["ExternalProcessor"]
    service = [svc.name, [(m.name, m.client_streaming, m.server_streaming) for m in svc.methods]]
pool = descriptor_pool.Default()
out = {}
for name in names:
    d = pool.FindMessageTypeByName(name)
    fields = {}
    for f in d.fields:
        kind = f.type
        # enum/message types compared by their short name (packages differ by design)
        ref = (f.message_type or f.enum_type)
        fields[f.name] = [f.number, kind, f.is_repeated, ref.name if ref else None,
                          f.containing_oneof.name if f.containing_oneof else None]
    enums = {e.name: {v.name: v.number for v in e.values} for e in d.enum_types}
    out[name] = {"fields": fields, "enums": enums}
print(json.dumps({"messages": out, "service": service}))
"""


def _dump(names: list[str], which: str, extra_path: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = extra_path or str(ROOT)
    with tempfile.TemporaryDirectory() as cwd:  # keep the repo's packages off sys.path[0]
        out = subprocess.run([sys.executable, "-c", DUMP, json.dumps(names), which], env=env, cwd=cwd,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def xds_ref() -> str:
    path = os.environ.get("XDS_REF_PATH")
    if not path or not Path(path, "envoy", "service", "ext_proc").exists():
        pytest.fail("XDS_REF_PATH must point at xds-protos installed with --target (make test does this)")
    return path


def test_fields_and_enums_match_envoy(xds_ref):
    ours = _dump([f"extproc.wire.v3.{n}" for n in PAIRS], "ours", None)
    theirs = _dump(list(PAIRS.values()), "envoy", xds_ref)
    for short, full in PAIRS.items():
        mine = ours["messages"][f"extproc.wire.v3.{short}"]
        ref = theirs["messages"][full]
        for fname, spec in mine["fields"].items():
            assert fname in ref["fields"], f"{short}.{fname} not in Envoy's {full}"
            r = ref["fields"][fname]
            # number, wire type, repeated, referenced type name, oneof
            if short == "HttpStatus" and fname == "code":
                assert (spec[0], r[0], r[1]) == (1, 1, 14)  # enum carried as int32: same varint
                continue
            assert spec == r, f"{short}.{fname}: ours {spec} != Envoy {r}"
        for ename, values in mine["enums"].items():
            assert values == ref["enums"][ename], f"{short}.{ename}"
    assert theirs["service"] == ["envoy.service.ext_proc.v3.ExternalProcessor", [["Process", True, True]]]
    assert ours["service"][1] == theirs["service"][1]


def test_service_registered_under_envoys_name():
    from extproc import wire

    assert wire.METHOD_PATH == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def test_generated_code_is_up_to_date(tmp_path):
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={tmp_path}", *protos])
    assert rc == 0
    for proto in protos:
        name = proto.replace(".proto", "_pb2.py")
        assert (tmp_path / name).read_text() == (ROOT / "extproc" / "_pb" / name).read_text(), \
            f"extproc/_pb/{name} is stale: run `make proto`"


def test_plain_install_gives_sidecar_and_otlp_exporters_together():
    """The point of not depending on xds-protos: both import in one process."""
    code = (
        "import extproc.wire, extproc.server;"
        "from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as G;"
        "from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as H;"
        "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope;"
        "G(endpoint='127.0.0.1:1', insecure=True); H(endpoint='http://127.0.0.1:1');print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
