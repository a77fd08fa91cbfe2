"""deploy/Dockerfile without a Docker engine: every COPY source exists in the build context (and
is not excluded by .dockerignore), the entrypoint is the CLI and its default command and the
Kubernetes args parse, the user is not root, the image is labelled and health-checked, and the
tokenizer baking step really works offline."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from extproc.cli import build_parser
from extproc.config import AdminSettings
from tests.k8s_render import container, pod_spec, render

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def final(word: str) -> list[str]:
    return [args for w, args in stages()[-1] if w == word]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    return [p.strip() for p in path.read_text().splitlines() if p.strip() and not p.startswith("#")] if path.exists() else []


def test_every_copy_source_exists_in_the_context() -> None:
    ignored = _dockerignore()
    copies = [(w, a) for st in stages() for w, a in st if w in ("COPY", "ADD")]
    assert copies
    for word, args in copies:
        parts = shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue  # from an earlier stage, checked below
        sources = [p for p in parts if not p.startswith("--")][:-1]
        assert sources, args
        for src in sources:
            assert word == "COPY", f"ADD {src}: use COPY"
            path = ROOT / src
            assert path.exists(), f"COPY {src}: not in the build context"
            assert not any(fnmatch.fnmatch(src, pat) or src.startswith(pat.rstrip("/") + "/") for pat in ignored), src


def test_copy_from_names_a_real_stage_and_path() -> None:
    names = {args.split()[-1] for st in stages() for w, args in st if w == "FROM" and " AS " in args.upper()}
    for args in final("COPY"):
        parts = shlex.split(args)
        src_stage = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
        if src_stage:
            assert src_stage in names, args
            build_text = " ".join(a for st in stages()[:-1] for _, a in st)
            assert parts[-2] in build_text  # the path the build stage filled


def test_multi_stage_slim_and_pinned() -> None:
    assert len(stages()) >= 2
    args = dict(a.split("=", 1) for w, a in instructions() if w == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    name, tag = base.split(":")
    assert name == "python" and "slim" in tag and tag.count(".") == 2, base  # a patch release
    assert stages()[-1][0][1] == "${PYTHON_IMAGE}"
    assert not final("RUN") or all("pip install" not in r for r in final("RUN"))  # no build tools in the final stage


def test_user_is_not_root() -> None:
    users = final("USER")
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) != 0
    objects = render("base")
    assert pod_spec(objects)["securityContext"]["runAsUser"] == int(uid)


def test_entrypoint_is_the_cli_and_commands_parse() -> None:
    entry = _exec_form(final("ENTRYPOINT")[-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == ["extproc"] and "extproc" in scripts
    cmd = _exec_form(final("CMD")[-1])
    args = build_parser().parse_args(cmd)
    assert args.command == "serve"
    # what Kubernetes runs: the image's entrypoint with the manifest's args
    sidecar = container(pod_spec(render("base")), "extproc")
    assert "command" not in sidecar
    k8s = build_parser().parse_args(sidecar["args"])
    assert k8s.command == "serve" and k8s.config == "/etc/extproc/config.yaml"


def test_no_extproc_settings_baked_in() -> None:
    """EXTPROC_* variables outrank the config file: an image default would silently override
    what the user mounts."""
    for env in final("ENV"):
        assert "EXTPROC_" not in env, env


def test_writable_paths_are_the_pods_volumes() -> None:
    volumes = [v for a in final("VOLUME") for v in _exec_form(a)]
    assert volumes == ["/var/lib/extproc"]
    mounts = {m["mountPath"] for m in container(pod_spec(render("base")), "extproc")["volumeMounts"]}
    assert set(volumes) <= mounts and "/tmp" in mounts
    assert final("WORKDIR")[-1] == "/opt/extproc"  # read-only at run time
    cmd = _exec_form(final("CMD")[-1])
    for flag in ("--data-dir", "--spool-dir"):
        assert cmd[cmd.index(flag) + 1].startswith("/var/lib/extproc/")


def test_healthcheck_and_labels() -> None:
    [health] = final("HEALTHCHECK")
    assert "--start-period=" in health
    cmd = _exec_form(health.split("CMD", 1)[1].strip())
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "HEALTHCHECK", "exec")
    assert f"127.0.0.1:{AdminSettings().port}/healthz" in cmd[2]
    labels = " ".join(final("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_tokenizer_baking_step_works_offline(tmp_path: Path) -> None:
    """The build's seeding RUN, executed here with the same TIKTOKEN_CACHE_DIR mechanism and
    no network: the rank files land where the final stage's ENV points tiktoken."""
    [seed] = [a for w, a in stages()[0] if w == "RUN" and "tiktoken_counter" in a]
    code = shlex.split(seed)[2]
    cache_env = [a for a in final("ENV") if "TIKTOKEN_CACHE_DIR=" in a]
    assert cache_env and "TIKTOKEN_CACHE_DIR=/opt/extproc/tiktoken" in cache_env[0]
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path),
           # no proxy that works: a download attempt fails instead of succeeding
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    from extproc.tokenizers import _TIKTOKEN_CACHE_KEYS

    assert {p.name for p in tmp_path.iterdir()} >= set(_TIKTOKEN_CACHE_KEYS.values())


@pytest.mark.parametrize("word", ["ENTRYPOINT", "CMD"])
def test_exec_form_only(word: str) -> None:
    """Shell form would run under /bin/sh, which does not forward SIGTERM to the sidecar."""
    for args in final(word):
        _exec_form(args)
