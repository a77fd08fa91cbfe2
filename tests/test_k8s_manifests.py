"""deploy/k8s: every overlay renders with plain `kubectl kustomize`, every object validates
against the Kubernetes schemas (kubernetes-validate, strict) or, for the CRD kinds it has no
schema for, against the shape checked here; the Envoy and sidecar configs inside the rendered
ConfigMaps are the repository's own and are accepted by the real Envoy and the sidecar."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.config import load_settings
from extproc.devtools.envoy_config import EnvoyOptions, render_yaml
from extproc.governance.pricing import load_pricing
from tests.k8s_render import (
    K8S,
    OVERLAYS,
    ROOT,
    container,
    env_value,
    one,
    pod_spec,
    render,
    volume_configmap,
)
from tests.system_packages import need_binary
from tests.test_telemetry_deploy import exposition, parse_promql  # noqa: F401 (fixture)

# 1.29: native sidecar containers on by default; and the newest schemas the package ships
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ClickHouseInstallation", "PrometheusRule", "ServiceMonitor"}
ENVOY_ARGS_UPSTREAM = "http://vllm.inference.svc:8000"


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_object_validates_strictly(rendered) -> None:
    name, objects = rendered
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue  # shapes checked below
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} against {version}: {exc.message} "
                            f"at {list(exc.path)}")


def test_only_known_crd_kinds(rendered) -> None:
    """A kind kubernetes-validate has no schema for must be one of the CRDs shape-checked here."""
    _, objects = rendered
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in CRD_KINDS, obj["kind"]


def test_envoy_config_in_the_configmap_passes_envoy_validate(rendered, tmp_path) -> None:
    _, objects = rendered
    data = volume_configmap(objects, pod_spec(objects), "envoy-config")
    path = tmp_path / "envoy.yaml"
    path.write_text(data["envoy.yaml"])
    from extproc.devtools.devstack import envoy_binary

    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr


def test_envoy_config_is_the_renderers() -> None:
    """deploy/k8s/base/envoy.yaml is generated (header comment): a hand edit would drift."""
    path = K8S / "base" / "envoy.yaml"
    body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
    want = render_yaml(EnvoyOptions(upstream=ENVOY_ARGS_UPSTREAM, listen_host="0.0.0.0",
                                    health_check_path="/envoy/ready"))
    assert yaml.safe_load(body) == yaml.safe_load(want)
    # and the ConfigMap carries exactly this file
    objects = render("base")
    assert volume_configmap(objects, pod_spec(objects), "envoy-config")["envoy.yaml"] == path.read_text()


def test_sidecar_config_loads_and_matches_envoy(rendered, tmp_path) -> None:
    name, objects = rendered
    spec = pod_spec(objects)
    path = tmp_path / "config.yaml"
    path.write_text(volume_configmap(objects, spec, "extproc-config")["config.yaml"])
    assert path.read_text() == (K8S / "base" / "extproc.yaml").read_text()
    sidecar = container(spec, "extproc")
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    settings = load_settings(path, environ=env)
    assert sidecar["args"] == ["serve", "--config", "/etc/extproc/config.yaml"]
    # Envoy's ext_proc cluster points at what the sidecar listens on; the sidecar's admin
    # port is the one the probes and Envoy's preStop use
    envoy_cfg = yaml.safe_load(volume_configmap(objects, spec, "envoy-config")["envoy.yaml"])
    cluster = next(c for c in envoy_cfg["static_resources"]["clusters"] if c["name"] == "extproc")
    sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert settings.grpc.listen == f"{sock['address']}:{sock['port_value']}"
    assert sock["address"] == "127.0.0.1"  # ext_proc stays inside the pod
    assert envoy_cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert settings.admin.envoy_admin_url == f"http://127.0.0.1:{envoy_cfg['admin']['address']['socket_address']['port_value']}"
    admin_port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "admin")
    assert settings.admin.port == admin_port and settings.admin.host == "0.0.0.0"
    envoy = container(spec, "envoy")
    assert envoy["lifecycle"]["preStop"]["httpGet"]["port"] == admin_port
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/envoy/ready"
    assert settings.spool.dir.startswith("/var/lib/extproc")
    if name == "clickhouse":
        assert env_value(sidecar, "EXTPROC_STORAGE__DSN")["secretKeyRef"]["name"] == "extproc-clickhouse"


def _containers(objects: list[dict[str, Any]]):
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", ()), *spec["containers"]]:
            yield obj["metadata"]["name"], spec, c


def test_pods_are_locked_down_and_sized(rendered) -> None:
    _, objects = rendered
    for deployment, spec, c in _containers(objects):
        where = f"{deployment}/{c['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
        assert spec["automountServiceAccountToken"] is False, where
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], where
        image = c["image"]
        tag = image.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith((":latest", ":main")), f"{where}: image {image} not pinned"
        assert c.get("readinessProbe") and c.get("livenessProbe"), where


def test_lifecycle_order(rendered) -> None:
    """Native sidecar: extproc starts before Envoy (startupProbe gates it) and stops after it;
    Envoy drains through the sidecar in its preStop; the grace period covers the drain."""
    _, objects = rendered
    spec = pod_spec(objects)
    [sidecar] = spec["initContainers"]
    assert sidecar["name"] == "extproc" and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert [c["name"] for c in spec["containers"]] == ["envoy"]
    envoy = spec["containers"][0]
    hook = envoy["lifecycle"]["preStop"]["httpGet"]["path"]
    assert hook.startswith("/v1/envoy/drain?")
    drain_timeout = float(hook.split("timeout_s=")[1].split("&")[0])
    args = envoy["args"]
    assert float(args[args.index("--drain-time-s") + 1]) > drain_timeout  # Envoy waits for us
    assert spec["terminationGracePeriodSeconds"] >= drain_timeout + 15  # + stop and flush
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["spool"]["mountPath"] == "/var/lib/extproc" and not mounts["spool"].get("readOnly")
    assert mounts["extproc-config"]["readOnly"] is True
    # every mount point lies outside the other mounts (a mount inside a read-only ConfigMap fails)
    paths = sorted(m["mountPath"] for m in sidecar["volumeMounts"])
    assert not any(b.startswith(a + "/") for a in paths for b in paths if a != b), paths


def test_opentelemetry_by_the_standard_variables(rendered) -> None:
    name, objects = rendered
    sidecar = container(pod_spec(objects), "extproc")
    assert not any(e["name"].startswith("EXTPROC_METRICS__") for e in sidecar["env"])
    attrs = env_value(sidecar, "OTEL_RESOURCE_ATTRIBUTES")
    for key, var in (("k8s.pod.name", "POD_NAME"), ("k8s.namespace.name", "POD_NAMESPACE"),
                     ("k8s.node.name", "NODE_NAME"), ("k8s.pod.uid", "POD_UID")):
        assert f"{key}=$({var})" in attrs
        assert "fieldRef" in env_value(sidecar, var)  # the downward API
    names = [e["name"] for e in sidecar["env"]]
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")  # $(VAR) expands earlier vars only
    exporters = env_value(sidecar, "OTEL_METRICS_EXPORTER")
    if name == "clickhouse":
        assert exporters == "otlp,prometheus"
        assert env_value(sidecar, "OTEL_EXPORTER_OTLP_ENDPOINT") == "http://otel-collector:4318"
        one(objects, "Service", "otel-collector")
    else:
        assert exporters == "prometheus"


def test_client_service_only(rendered) -> None:
    _, objects = rendered
    svc = one(objects, "Service", "llm-gateway")
    assert [p["port"] for p in svc["spec"]["ports"]] == [10000]
    admin = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "llm-gateway-admin"]
    for a in admin:  # monitoring: inside the cluster only, per pod
        assert a["spec"]["clusterIP"] == "None" and a["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_embedded_overlay(tmp_path) -> None:
    objects = render("embedded")
    dep = one(objects, "Deployment", "llm-gateway")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")]
    spool = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "spool")
    assert spool == {"name": "spool", "persistentVolumeClaim": {"claimName": "extproc-data"}}
    one(objects, "PersistentVolumeClaim", "extproc-data")
    assert {o["metadata"].get("namespace") for o in objects} == {"inference"}


def test_base_scaling_objects() -> None:
    objects = render("base")
    hpa = one(objects, "HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llm-gateway" and hpa["spec"]["minReplicas"] >= 2
    pdb = one(objects, "PodDisruptionBudget", "llm-gateway")
    labels = one(objects, "Deployment", "llm-gateway")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- the CRD objects: their shape, checked by hand ----------------------------------------------
def test_clickhouse_installation_shape() -> None:
    objects = render("clickhouse")
    chi = one(objects, "ClickHouseInstallation", "extproc")
    assert chi["apiVersion"] == "clickhouse.altinity.com/v1"
    spec = chi["spec"]
    [cluster] = spec["configuration"]["clusters"]
    assert cluster["layout"]["shardsCount"] >= 1 and cluster["layout"]["replicasCount"] >= 1
    users = spec["configuration"]["users"]
    secret_name, key = users["extproc/k8s_secret_password"].split("/")
    secret = one(objects, "Secret", secret_name)  # unhashed: the reference is a plain string
    assert secret["metadata"]["name"] == secret_name and key in secret["data"]
    templates = spec["templates"]
    assert spec["defaults"]["templates"]["dataVolumeClaimTemplate"] in {t["name"] for t in templates["volumeClaimTemplates"]}
    assert spec["defaults"]["templates"]["podTemplate"] in {t["name"] for t in templates["podTemplates"]}
    import base64

    dsn = base64.b64decode(secret["data"]["dsn"]).decode()
    assert "@clickhouse-extproc:8123/" in dsn  # the operator's Service: clickhouse-<name>
    collector = container(pod_spec(objects, "otel-collector"), "otel-collector")
    assert "clickhouse-extproc:9000" in env_value(collector, "CLICKHOUSE_ENDPOINT")


def test_collector_config_is_the_repositorys() -> None:
    objects = render("clickhouse")
    spec = pod_spec(objects, "otel-collector")
    data = volume_configmap(objects, spec, "config")
    assert data["collector.yaml"] == (ROOT / "deploy" / "otel" / "collector.yaml").read_text()
    c = container(spec, "otel-collector")
    assert c["args"] == ["--config=/etc/otelcol/collector.yaml"]
    assert env_value(c, "OTELCOL_BIND_HOST") == "0.0.0.0"


def test_servicemonitor_finds_the_admin_port() -> None:
    objects = render("clickhouse")
    sm = one(objects, "ServiceMonitor", "llm-gateway")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [o for o in objects if o["kind"] == "Service"
                and sm["spec"]["selector"]["matchLabels"].items() <= o["metadata"].get("labels", {}).items()]
    assert [s["metadata"]["name"] for s in selected] == ["llm-gateway-admin"]
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    pod_labels = one(objects, "Deployment", "llm-gateway")["spec"]["template"]["metadata"]["labels"]
    assert selected[0]["spec"]["selector"].items() <= pod_labels.items()


def test_prometheus_rules_use_exported_metrics(exposition) -> None:  # noqa: F811 (fixture)
    objects = render("clickhouse")
    rule = one(objects, "PrometheusRule", "llm-gateway")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    alerts = {}
    for g in groups:
        for r in g["rules"]:
            assert set(r) <= {"record", "alert", "expr", "for", "labels", "annotations"}, r
            assert ("record" in r) != ("alert" in r) and r["expr"].strip()
            metrics, labels = parse_promql(r["expr"])
            for m in metrics - recorded:
                assert m in exposition.labels, f"{r.get('alert') or r['record']}: {m} is not exported"
                # label names the rule filters or groups on exist on that metric (or are target labels)
                assert labels - exposition.labels[m] <= {"namespace", "pod", "team", "token_type"}, (m, labels)
            if "alert" in r:
                alerts[r["alert"]] = r
                assert r["labels"]["severity"] in {"info", "warning", "critical"}
                assert r["annotations"]["summary"]
    # the alerts the issue lists
    assert {"ExtprocMeteringErrors", "ExtprocEventsDropped", "ExtprocSpoolGrowing", "ExtprocTeamTokenRateHigh"} <= set(alerts)
    assert "extproc_storage_events_dropped_total" in alerts["ExtprocEventsDropped"]["expr"]
    tokens_labels = exposition.labels["extproc_tokens_total"]
    assert {"team", "token_type"} <= tokens_labels


def test_kustomize_needs_no_load_restrictor() -> None:
    """Every generator file lies under its own kustomization (kustomize's default refuses others)."""
    for kfile in [*K8S.rglob("kustomization.yaml"), ROOT / "deploy" / "otel" / "kustomization.yaml"]:
        k = yaml.safe_load(kfile.read_text())
        for gen in [*k.get("configMapGenerator", ()), *k.get("secretGenerator", ())]:
            for f in [*gen.get("files", ()), *gen.get("envs", ())]:
                src = Path(kfile.parent, f.split("=", 1)[-1]).resolve()
                assert src.is_file() and kfile.parent.resolve() in src.parents, (kfile, f)


def test_pricing_configmap_is_the_example_and_the_sidecar_uses_it(rendered, tmp_path) -> None:
    """deploy/k8s/base/pricing.yaml is a copy of deploy/pricing.example.yaml (kustomize reads no
    file outside its directory); the pod mounts it read-only where pricing.file points."""
    name, objects = rendered
    example = ROOT / "deploy" / "pricing.example.yaml"
    assert (K8S / "base" / "pricing.yaml").read_text() == example.read_text(), \
        "refresh it: cp deploy/pricing.example.yaml deploy/k8s/base/pricing.yaml"
    spec = pod_spec(objects)
    data = volume_configmap(objects, spec, "extproc-pricing")
    assert data == {"pricing.yaml": example.read_text()}
    path = tmp_path / "pricing.yaml"
    path.write_text(data["pricing.yaml"])
    book, want = load_pricing(path), load_pricing(example)
    assert (book.currency, book.models, book.pools) == (want.currency, want.models, want.pools)
    assert book.models and book.pools, "the example prices no model"

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(volume_configmap(objects, spec, "extproc-config")["config.yaml"])
    sidecar = container(spec, "extproc")
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    settings = load_settings(cfg_path, environ=env)
    [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == "extproc-pricing"]
    assert mount["readOnly"] is True
    assert settings.pricing.file == f"{mount['mountPath']}/pricing.yaml", name
    volume = next(v for v in spec["volumes"] if v["name"] == "extproc-pricing")
    assert "optional" not in volume["configMap"]  # no prices is an error at start, not a silent zero


def test_an_overlay_replaces_the_prices(tmp_path) -> None:
    """What deploy/README.md tells users to do with their own prices renders as said."""
    overlay = tmp_path / "prices"
    overlay.mkdir()
    mine = (ROOT / "deploy" / "pricing.example.yaml").read_text().replace(
        "input_per_mtok: 0.20", "input_per_mtok: 0.25")
    (overlay / "pricing.yaml").write_text(mine)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "configMapGenerator": [{"name": "extproc-pricing", "behavior": "replace",
                                "files": ["pricing.yaml"]}],
    }))
    out = subprocess.run([need_binary("kubectl"), "kustomize", str(overlay)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    data = volume_configmap(objects, pod_spec(objects), "extproc-pricing")
    assert data == {"pricing.yaml": mine}
    path = tmp_path / "pricing.yaml"
    path.write_text(data["pricing.yaml"])
    assert load_pricing(path).models != load_pricing(ROOT / "deploy" / "pricing.example.yaml").models
