"""Real pod processes for the integration tests: ``baton serve prefill|decode|router`` subprocesses, readiness
read from their stdout, logs captured, Prometheus metrics scraped from their live ``/metrics``; a real
``redis-server`` on a free port."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc

from services.common.protos import inference_pb2, inference_pb2_grpc, pd_pb2_grpc

READY_TIMEOUT_S = 120


class Pod:
    def __init__(self, role: str, *args: str) -> None:
        self.role = role
        self.args = list(args)
        self._lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self._log_changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", role, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()
        self.info = self._wait_ready()
        self.port = self.info["port"]
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)

    def _pump(self, stream, is_stdout: bool) -> None:
        for line in stream:
            if is_stdout and line.startswith("BATON_READY "):
                self._lines.put(line)
            with self._log_changed:
                self.log.append(line.rstrip())
                self._log_changed.notify_all()
        if is_stdout:
            self._lines.put(None)  # process ended

    def _wait_ready(self) -> dict:
        try:
            line = self._lines.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            line = None
        if line is None:
            self.proc.kill()
            raise RuntimeError(f"{self.role} pod did not start:\n" + "\n".join(self.log[-40:]))
        return json.loads(line.split(" ", 1)[1])

    def mark(self) -> int:
        """A position in the log, for ``wait_for_log(..., since=mark)``."""
        with self._log_changed:
            return len(self.log)

    def wait_for_log(self, text: str, timeout: float = 60, since: int = 0) -> str:
        """Block until a log line containing ``text`` appears (not a sleep: woken by the log pump)."""
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                for line in self.log[since:]:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"{self.role} pod never logged {text!r}:\n" + "\n".join(self.log[-30:]))
                self._log_changed.wait(remaining)

    # ---- clients ------------------------------------------------------------------------------------
    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel)

    @property
    def prefill(self) -> pd_pb2_grpc.PrefillStub:
        return pd_pb2_grpc.PrefillStub(self.channel)

    def health(self) -> inference_pb2.HealthResponse:
        stub = self.prefill if self.role == "prefill" else self.inference
        return stub.Health(inference_pb2.HealthRequest(), timeout=10)

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels) -> value, from the pod's live /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.info['metrics_port']}/metrics", timeout=10).read()
        samples = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def generate(self, tokens: list[int], max_tokens: int = 12, **sampling) -> tuple[list[int], object]:
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=tokens),
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
        )
        out, last = [], None
        for response in self.inference.Generate(request, timeout=120):
            out.extend(response.token_ids)
            last = response
        return out, last

    # ---- lifecycle ----------------------------------------------------------------------------------
    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.channel.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.channel.close()


def assert_pod_clean(pod: Pod) -> None:
    """Nothing running or held; nothing quarantined; every page in use is a cached page; no working slot
    taken."""
    usage = pod.health().usage
    assert usage.running == 0 and usage.waiting == 0 and usage.held == 0, usage
    assert usage.pages_quarantined == 0 and usage.slots_quarantined == 0 and usage.checkpoints_quarantined == 0, usage
    assert usage.slots_used == 0, usage
    assert usage.pages_used == usage.pages_cached, usage


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """``redis-server`` with nothing persisted, on a free port (or a given one, to restart it empty)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        ready: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                if "Ready to accept connections" in line:
                    ready.put(True)
            ready.put(False)

        threading.Thread(target=pump, daemon=True).start()
        try:
            ok = ready.get(timeout=30)
        except queue.Empty:
            ok = False
        if not ok:
            self.proc.kill()
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """kill -9: everything it held is gone."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError).
    For state that is only observable by asking (another process's view), not a sleep in place of an event."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
