"""One process of the cluster (``redis-server`` or ``baton serve ROLE``), supervised from inside a Ray actor on the
node Ray placed it on: started, watched until it says it is ready, its output kept in a log file, stopped with
SIGTERM (then SIGKILL). The child gets SIGKILL if its supervisor dies (``setpriv --pdeathsig``), so killing an
actor, or Ray itself, never leaves a server behind.

Why a supervised process rather than the server inside the actor's own process: a pod is the same program with
the same signal handling and graceful drain as under Kubernetes or by hand, and one code path serves all three.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
from collections import deque
from pathlib import Path

BATON_READY = "BATON_READY "
REDIS_READY = "Ready to accept connections"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """This node's address as Ray knows it (loopback outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:
        return "127.0.0.1"


class ProcessSupervisor:
    """Runs ``argv``; ready when a line starts with ``BATON_READY `` (its JSON is the process's info) or contains
    ``REDIS_READY``. ``{node_ip}`` and ``{free_port}`` in ``argv`` become this node's address and a port free on
    it (chosen here, on the node that binds it). Methods are called through Ray (the actor wraps this class)."""

    def __init__(self, name: str, log_path: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv: list[str] = []
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.info: dict | None = None
        self._tail: deque[str] = deque(maxlen=60)
        self._ready = threading.Event()

    def start(self, argv: list[str], timeout_s: float) -> dict:
        """Start ``argv`` and wait until it is ready; returns its pid, node address and ready info. Raises
        RuntimeError (with the end of its output) if it exits or is not ready in time."""
        self.argv = list(argv)
        here = node_ip()
        port = str(free_port()) if any("{free_port}" in a for a in self.argv) else ""
        argv = [a.replace("{node_ip}", here).replace("{free_port}", port) for a in self.argv]
        setpriv = shutil.which("setpriv")
        if setpriv:  # the child dies with this process, whatever kills it
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=self.env, start_new_session=True)
        threading.Thread(target=self._pump, name=f"{self.name}-output", daemon=True).start()
        if not self._ready.wait(timeout_s) or self.info is None:
            self.stop(grace_s=5)
            state = f"exited with {self.proc.returncode}" if self.proc.returncode is not None else "not ready in time"
            raise RuntimeError(f"{self.name} {state}; its last output:\n" + "\n".join(self._tail))
        return {"name": self.name, "pid": self.proc.pid, "node": socket.gethostname(), "node_ip": here,
                "port": int(port) if port else None, "ready": self.info, "log": str(self.log_path)}

    def _pump(self) -> None:
        with self.log_path.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._tail.append(line.rstrip())
                if not self._ready.is_set():
                    if line.startswith(BATON_READY):
                        self.info = json.loads(line[len(BATON_READY):])
                        self._ready.set()
                    elif REDIS_READY in line:
                        self.info = {}
                        self._ready.set()
        self._ready.set()  # exited: whoever waits learns it now

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (a pod drains its streams), SIGKILL after ``grace_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self) -> str:
        return "\n".join(self._tail)
