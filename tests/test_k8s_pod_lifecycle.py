"""The gateway pod's lifecycle, played the way the kubelet plays it (tests/k8s_pod.py runs the two
containers from the rendered manifests), with streaming traffic through Envoy to the simulator.

native: the sidecar starts first and Envoy only once the sidecar's startupProbe passes; at
deletion Envoy's preStop hook (the manifest's GET on the sidecar's admin port) turns Envoy's
readiness false and drains it while streams are in flight; then SIGTERM to Envoy; only after
Envoy exited, SIGTERM to the sidecar.
together: the order without native sidecars (both containers signalled at once): the sidecar
gets SIGTERM while Envoy still drains; its readiness turns false at once, it keeps serving until
Envoy's connections close, then flushes.
Both: no stream fails, every request is one stored event, each process exits 0, all within
terminationGracePeriodSeconds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from extproc.storage import open_storage
from tests.k8s_pod import Pod
from tests.k8s_render import render
from tests.stack import sidecar_settings, start_sim
from tests.system_packages import need_binary

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CLIENTS = 4


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def _wait_for(pred, what: str, timeout: float, proc=None) -> None:  # noqa: ANN001
    """Poll a probe until it holds (the kubelet's way), failing fast if the process died."""
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


class Traffic:
    """Streaming clients through the pod's listener until the endpoint is removed (Envoy's
    readiness failed: what the endpoints controller does), counting streams in flight."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.removed = threading.Event()
        self.lock = threading.Condition()
        self.in_flight = 0
        self.completed = 0
        self.errors: list[str] = []

    def client(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="k", max_retries=0,
                               default_headers={"x-team": f"team{i % 2}"})
        while not self.removed.is_set():
            with self.lock:
                self.in_flight += 1
                self.lock.notify_all()
            try:
                stream = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"pod {i}"}], max_tokens=24, stream=True)
                finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
                if finish != ["length"] and finish != ["stop"]:
                    self.errors.append(f"client {i}: stream ended with {finish}")
            except openai.APIError as exc:
                self.errors.append(f"client {i}: {exc!r}")
            finally:
                with self.lock:
                    self.in_flight -= 1
                    self.completed += 1
                    self.lock.notify_all()

    def wait(self, pred, timeout: float = 60) -> None:  # noqa: ANN001
        with self.lock:
            assert self.lock.wait_for(lambda: pred(self), timeout), "traffic did not get there"


def _stored_rows(pod: Pod) -> int:
    async def count() -> int:
        settings = sidecar_settings(pod.root, storage={"dsn": f"chdb://{pod.data_dir}"},
                                    spool={"dir": str(pod.spool_dir)})
        storage = await open_storage(settings)
        sink = storage.sink()
        await sink.start()  # would replay what the shutdown left in the spool
        await sink.shutdown(30)
        replayed = storage.stats().get("events_replayed", 0)
        rows, unpriced = await storage.run(lambda c: c.query(
            "SELECT count(), countIf(price_status != 'priced') FROM usage_events").result_rows[0])
        await storage.close()
        assert replayed == 0, f"{replayed} events were left in the spool by the shutdown"
        assert unpriced == 0, f"{unpriced} of {rows} events not priced by the mounted pricing file"
        return rows

    return asyncio.run(count())


@pytest.mark.parametrize("order", ["native", "together"])
def test_pod_lifecycle_loses_nothing(tmp_path: Path, order: str) -> None:
    need_binary("kubectl")
    objects = render("base")
    sim, sim_url = start_sim(tmp_path, "--tokens-per-second", "30")
    pod = Pod(objects, sim_url)
    try:
        _run(pod, order)
    finally:
        pod.kill_all()
        sim.stop()
        for c in (pod.sidecar, pod.envoy):
            if c.log.exists():
                (tmp_path / c.log.name).write_bytes(c.log.read_bytes())  # kept for a failure's report
        pod.cleanup()


def _run(pod: Pod, order: str) -> None:
    sidecar, envoy = pod.sidecar, pod.envoy
    hook = pod.envoy_container["lifecycle"]["preStop"]["httpGet"]
    assert hook["port"] == pod.sidecar_cfg["admin"]["port"] or hook["port"] == 8081
    envoy_ready = pod.envoy_container["readinessProbe"]["httpGet"]["path"]

    # start: the native sidecar first; Envoy once its startupProbe passes
    pod.start(sidecar)
    _wait_for(lambda: _get(pod.url("sidecar_admin", "/healthz"))[0] == 200, "sidecar startupProbe", 120, sidecar.proc)
    assert envoy.proc is None
    pod.start(envoy)
    _wait_for(lambda: _get(pod.url("listener", envoy_ready))[0] == 200, "Envoy readinessProbe", 60, envoy.proc)
    assert _get(pod.url("sidecar_admin", "/readyz")) == (200, "ok\n")

    traffic = Traffic(pod.url("listener", ""))
    pool = ThreadPoolExecutor(CLIENTS)
    futures = [pool.submit(traffic.client, i) for i in range(CLIENTS)]
    try:
        traffic.wait(lambda t: t.completed >= 8 and t.in_flight >= 2)

        # deletion
        t0 = time.monotonic()
        hook_result: dict = {}

        def pre_stop() -> None:
            status, body = _get(pod.url("sidecar_admin", hook["path"]), timeout=pod.grace_s)
            hook_result.update(status=status, body=json.loads(body) if body else {}, at=time.monotonic())

        hook_thread = threading.Thread(target=pre_stop)
        hook_thread.start()
        if order == "together":
            sidecar.proc.send_signal(signal.SIGTERM)
            # readiness false at once, while Envoy still holds its connections and streams run
            _wait_for(lambda: _get(pod.url("sidecar_admin", "/readyz"))[0] == 503, "sidecar readiness false", 10)
            assert sidecar.proc.poll() is None and envoy.proc.poll() is None
            assert _get(pod.url("sidecar_admin", "/healthz"))[0] == 200  # liveness stays up

        _wait_for(lambda: _get(pod.url("listener", envoy_ready))[0] == 503, "Envoy readiness false", 10)
        with traffic.lock:
            in_flight_when_unready = traffic.in_flight
        assert not hook_result, "readiness must fail before the drain completes"
        traffic.removed.set()  # the endpoints controller takes the pod out
        assert in_flight_when_unready >= 1

        hook_thread.join(pod.grace_s)
        assert hook_result["status"] == 200, hook_result
        assert hook_result["body"]["drained"] is True and hook_result["body"]["active_requests"] == 0
        for f in futures:
            f.result(timeout=30)  # every stream that was running finished
        assert not traffic.errors, traffic.errors[:5]
        assert traffic.in_flight == 0

        envoy.proc.send_signal(signal.SIGTERM)
        assert envoy.proc.wait(pod.grace_s) == 0
        if order == "native":
            assert sidecar.proc.poll() is None  # still up: it stops after Envoy
            sidecar.proc.send_signal(signal.SIGTERM)
        rc = sidecar.proc.wait(max(1.0, pod.grace_s - (time.monotonic() - t0)))
        elapsed = time.monotonic() - t0
    finally:
        traffic.removed.set()
        pool.shutdown(wait=True)
    assert rc == 0
    print(f"{order}: termination took {elapsed:.1f} s of the {pod.grace_s:.0f} s grace period")
    assert elapsed <= pod.grace_s, f"{elapsed:.1f} s > terminationGracePeriodSeconds {pod.grace_s}"

    log = sidecar.log.read_text()
    assert "readiness false" in log and log.index("readiness false") < log.index("stopped:")
    if order == "together":
        assert "Envoy's connections are closed" in log
    assert ", 0 left in the spool" in log and ", 0 dropped" in log, log[-2000:]
    # one stored event per request the clients made, nothing left to replay
    assert _stored_rows(pod) == traffic.completed
    # nothing was written outside the declared volumes
    assert not any(p for p in pod.rootfs.rglob("*") if p.is_file() and "tiktoken" not in p.parts), \
        list(pod.rootfs.rglob("*"))
