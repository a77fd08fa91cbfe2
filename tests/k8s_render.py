"""Rendered Kubernetes manifests (kubectl kustomize) for the tests: objects, containers, the
files inside generated ConfigMaps."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.system_packages import need_binary

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"base": K8S / "base", "embedded": K8S / "overlays" / "embedded",
            "clickhouse": K8S / "overlays" / "clickhouse"}


def render(name: str) -> list[dict[str, Any]]:
    kubectl = need_binary("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(OVERLAYS[name])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of this kind and name (generated ones: the name plus kustomize's hash suffix)."""
    pattern = re.compile(re.escape(name) + r"(-[a-z0-9]{10})?")
    found = [o for o in objects if o["kind"] == kind and pattern.fullmatch(o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]], deployment: str = "llm-gateway") -> dict[str, Any]:
    return one(objects, "Deployment", deployment)["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for c in [*spec.get("initContainers", ()), *spec.get("containers", ())]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def volume_configmap(objects: list[dict[str, Any]], spec: dict[str, Any], volume: str) -> dict[str, str]:
    """The files of the ConfigMap a pod volume mounts (by its rendered, hashed name)."""
    vol = next(v for v in spec["volumes"] if v["name"] == volume)
    return one(objects, "ConfigMap", vol["configMap"]["name"])["data"]


def env_value(c: dict[str, Any], name: str) -> Any:
    for e in c.get("env", ()):
        if e["name"] == name:
            return e.get("value", e.get("valueFrom"))
    raise KeyError(name)
