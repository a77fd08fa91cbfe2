"""The gateway pod, run on this machine as Kubernetes would run it: the containers' own args, the
files of the rendered ConfigMaps, a read-only root (the working directory, home and the config
files) where only the declared volumes are writable, the env with the downward API filled in.
As root (CI), each container runs in a mount namespace of its own where the pod's directory is
bind-mounted read-only and the writable volumes on top (the venv's interpreter lives under
/root, which the pod's uid 10001 cannot reach, so the user stays root: the read-only mount, not
file modes, is what stops writes); otherwise file modes make the same directories read-only.

What must differ is translated, and only that: container paths map to directories here (each
volume mount to a directory of its own), and the pod's fixed ports and 0.0.0.0 binds become free
ports on 127.0.0.1 (tests bind loopback only; other tests run in parallel). Every address in the
two config files is translated or the translation fails.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.devtools.devstack import envoy_binary, free_port
from tests.k8s_render import ROOT, container, pod_spec, volume_configmap

POD_NAME = "llm-gateway-7c9d-test"
POD_ENV = {"metadata.name": POD_NAME, "metadata.namespace": "inference", "metadata.uid": "0000-test",
           "spec.nodeName": "node-test"}


@dataclass
class PodContainer:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    proc: subprocess.Popen | None = None


@dataclass
class Pod:
    objects: list[dict[str, Any]]
    upstream: str  # http://127.0.0.1:PORT of the simulator standing in for vllm.inference.svc
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-pod-", dir="/tmp")))

    def __post_init__(self) -> None:
        self.spec = pod_spec(self.objects)
        self.as_root = os.geteuid() == 0
        os.chmod(self.root, 0o755)
        self.rootfs = self.root / "rootfs"
        self.ports = {"sidecar_grpc": free_port(), "sidecar_admin": free_port(), "envoy_admin": free_port(),
                      "listener": free_port()}
        self.grace_s = float(self.spec["terminationGracePeriodSeconds"])
        self.sidecar = self._sidecar()
        self.envoy = self._envoy()
        self._seal()

    # --- paths ------------------------------------------------------------------------------
    def _mounts(self, c: dict[str, Any]) -> dict[str, Path]:
        """container mount path -> host directory, one per declared volume mount."""
        out: dict[str, Path] = {}
        for m in c["volumeMounts"]:
            vol = next(v for v in self.spec["volumes"] if v["name"] == m["name"])
            host = self.root / "volumes" / c["name"] / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                for fname, text in volume_configmap(self.objects, self.spec, m["name"]).items():
                    (host / fname).write_text(text)
            out[m["mountPath"]] = host
        return out

    @staticmethod
    def _host(path: str, mounts: dict[str, Path]) -> str:
        for mount, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if path == mount or path.startswith(mount + "/"):
                return str(host) + path[len(mount):]
        raise AssertionError(f"{path} is not on a declared volume")

    def _env(self, c: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in c.get("env", ()):
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
            else:
                env[e["name"]] = POD_ENV[e["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    # --- the containers ---------------------------------------------------------------------
    def _sidecar(self) -> PodContainer:
        c = container(self.spec, "extproc")
        mounts = self._mounts(c)
        cfg_path = self._host("/etc/extproc/config.yaml", mounts)
        args = list(c["args"])
        args[args.index("--config") + 1] = cfg_path
        cfg = yaml.safe_load(Path(cfg_path).read_text())
        assert cfg["grpc"]["listen"] == "127.0.0.1:50051" and cfg["admin"]["host"] == "0.0.0.0"
        cfg["grpc"]["listen"] = f"127.0.0.1:{self.ports['sidecar_grpc']}"
        cfg["admin"].update(host="127.0.0.1", port=self.ports["sidecar_admin"],
                            envoy_admin_url=f"http://127.0.0.1:{self.ports['envoy_admin']}")
        dsn = cfg["storage"]["dsn"]
        assert dsn.startswith("chdb://")
        cfg["storage"]["dsn"] = "chdb://" + self._host(dsn[len("chdb://"):], mounts)
        cfg["spool"]["dir"] = self._host(cfg["spool"]["dir"], mounts)
        if cfg.get("pricing", {}).get("file"):  # on its read-only ConfigMap volume
            cfg["pricing"]["file"] = self._host(cfg["pricing"]["file"], mounts)
        Path(cfg_path).write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.data_dir = Path(cfg["storage"]["dsn"][len("chdb://"):])
        self.spool_dir = Path(cfg["spool"]["dir"])
        self.sidecar_cfg = cfg
        # the image's environment (deploy/Dockerfile), its baked tokenizer cache included
        cache = self.rootfs / "opt" / "extproc" / "tiktoken"
        cache.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", "from extproc.tokenizers import tiktoken_counter as t; "
                        "[t(e) for e in ('o200k_base', 'cl100k_base')]"],
                       env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}, check=True, timeout=120)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "HOME": str(self.rootfs / "nonexistent"),
               "TIKTOKEN_CACHE_DIR": str(cache), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
               "TMPDIR": self._host("/tmp", mounts), **self._env(c)}
        self.sidecar_mounts = mounts
        return PodContainer("extproc", [sys.executable, "-m", "extproc", *args], env,
                            self.rootfs / "opt" / "extproc", self.root / "extproc.log")

    def _envoy(self) -> PodContainer:
        c = container(self.spec, "envoy")
        mounts = self._mounts(c)
        args = list(c["args"])
        path = self._host(args[args.index("-c") + 1], mounts)
        args[args.index("-c") + 1] = path
        boot = yaml.safe_load(Path(path).read_text())
        admin = boot["admin"]["address"]["socket_address"]
        assert admin["address"] == "127.0.0.1"
        admin["port_value"] = self.ports["envoy_admin"]
        [listener] = boot["static_resources"]["listeners"]
        addr = listener["address"]["socket_address"]
        assert (addr["address"], addr["port_value"]) == ("0.0.0.0", 10000)
        addr.update(address="127.0.0.1", port_value=self.ports["listener"])
        host, port = self.upstream.removeprefix("http://").split(":")
        for cluster in boot["static_resources"]["clusters"]:
            sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            if cluster["name"] == "extproc":
                assert f"{sock['address']}:{sock['port_value']}" == "127.0.0.1:50051"
                sock["port_value"] = self.ports["sidecar_grpc"]
            else:
                assert sock["address"] == "vllm.inference.svc"
                sock.update(address=host, port_value=int(port))
                cluster["type"] = "STATIC"
        Path(path).write_text(yaml.safe_dump(boot, sort_keys=False))
        self.envoy_boot = boot
        self.envoy_container = c
        return PodContainer("envoy", [envoy_binary(), *args], {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                              "HOME": str(self.rootfs / "nonexistent"),
                                                              **self._env(c)},
                            self.rootfs, self.root / "envoy.log")

    def _seal(self) -> None:
        """Read-only by file mode (what a non-root run relies on): the rootfs and the config
        volumes r-x / r--, the other declared volumes writable."""
        writable = self.writable = sorted(p for mount, p in self.sidecar_mounts.items() if not mount.startswith("/etc/"))
        for dirpath, _dirnames, filenames in os.walk(self.root):
            d = Path(dirpath)
            if any(d == w or w in d.parents for w in writable):
                os.chmod(d, 0o770)
                continue
            for f in filenames:
                os.chmod(d / f, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.chmod(d, 0o555)
        os.chmod(self.root, 0o755)  # logs are written here by the test itself (as root)

    # --- running ----------------------------------------------------------------------------
    def start(self, c: PodContainer) -> None:
        out = open(c.log, "ab")  # noqa: SIM115 (the child keeps it)
        argv, cwd = c.argv, c.cwd
        if self.as_root:
            # the volumes first, then the pod's directory (with them) read-only on top; cd only
            # after the remount, or the working directory would still be the writable one
            script = ('set -e; for v in "$@"; do [ "$v" = -- ] && break; mount --bind "$v" "$v"; done; '
                      f'mount --rbind {self.root} {self.root}; mount -o remount,bind,ro {self.root}; '
                      'while [ "$1" != -- ]; do shift; done; shift; cd "$0"; exec "$@"')
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(c.cwd),
                    *map(str, self.writable if c is self.sidecar else ()), "--", *c.argv]
            cwd = Path("/")
        c.proc = subprocess.Popen(argv, env=c.env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def url(self, port: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def kill_all(self) -> None:
        for c in (self.envoy, self.sidecar):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(10)

    def cleanup(self) -> None:
        self.kill_all()
        for dirpath, _dirs, _files in os.walk(self.root):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(self.root, ignore_errors=True)
