"""``baton up``: a whole cluster from one command. Redis (a ``redis-server`` when no URL is given), the routers,
N prefill and M decode pods, each a process supervised by a Ray actor (``process.py``), on an embedded local Ray
(``ray.init()``) or an existing Ray cluster (``--ray-address``); one GPU per pod where the cluster has GPUs.

It waits until every process is ready and every router sees every pod, prints the endpoints, and runs until
Ctrl-C / SIGTERM (or, for ``make run``, until a given function returns). Shutdown: routers first (no new
requests), then pods (they drain), then Redis; the actors are killed, an embedded Ray is shut down, and every
process of the cluster on this node is checked gone by pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from services.common.protos import inference_pb2, inference_pb2_grpc

from .config import UpConfig
from .process import ProcessSupervisor

log = logging.getLogger("baton.up")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ShutdownRequested(BaseException):
    """SIGINT / SIGTERM: leave whatever is running (startup included) and shut the cluster down."""


@dataclass
class Member:
    """One process of the cluster: its actor and what it reported when ready."""

    name: str
    role: str
    host: str  # the address it binds
    actor: object
    argv: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.info["pid"]


@dataclass
class Cluster:
    """What ``baton up`` started, and where to reach it."""

    redis_url: str
    members: list[Member] = field(default_factory=list)
    log_dir: str = ""

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def endpoints(self, tls: bool) -> dict:
        scheme = "https" if tls else "http"

        def host(member: Member) -> str:
            return member.info["address"].rpartition(":")[0]

        routers = [{"grpc": m.info["address"],
                    "http": f"{scheme}://{host(m)}:{m.info['ready']['http_port']}/v1"
                    if m.info["ready"]["http_port"] >= 0 else "",
                    "metrics": f"http://{host(m)}:{m.info['ready']['metrics_port']}/metrics"} for m in self.routers]
        return {"routers": routers, "redis": self.redis_url,
                "prefill": [m.info["address"] for m in self.of("prefill")],
                "decode": [m.info["address"] for m in self.of("decode")],
                "pids": {m.name: m.pid for m in self.members}, "log_dir": self.log_dir}

    @property
    def routers(self) -> list[Member]:
        return self.of("router")


def _supervisor_class():
    """ProcessSupervisor as a Ray actor. No CPUs reserved (the actor only waits on its child; the pods' own
    threads are what uses the machine) and one restart never: a dead process is reported, not hidden."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProcessSupervisor)


def _serve_argv(role: str, config: UpConfig, redis_url: str, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "services.cli", "serve", role, "--served-model-name", config.model_name,
            "--redis-url", redis_url, "--host", config.host, "--metrics-port", "0"]
    if role == "router":
        argv += ["--model", config.engine.model, "--page-size", str(config.engine.page_size),
                 "--policy", config.policy, *config.gateway_flags(), *shlex.split(config.router_args)]
        if config.engine.tokenizer:
            argv += ["--tokenizer", config.engine.tokenizer]
    else:
        argv += [*config.engine_flags(), *shlex.split(config.pod_args)]
    return argv + ["--drain-grace-s", str(config.drain_grace_s)] + extra


def _network_flags(role: str, config: UpConfig, index: int = 0) -> list[str]:
    """Ports and advertised addresses. On loopback every process takes any free port and says which. A pod bound
    to all interfaces (a multi-node cluster) must advertise its node's address with its port, so its supervisor
    fills in the node's address and a port free there (``{node_ip}``, ``{free_port}``) before starting it. Only
    the first router takes the configured ports (the others any)."""
    if role == "router":
        ports = ["--port", str(config.router_port if index == 0 else 0)]
        if index > 0 and config.gateway.http_port > 0:
            ports += ["--http-port", "0"]
    else:
        ports = ["--port", "0"]
    if config.host in _LOOPBACK or role == "router":
        return ports
    return ["--port", "{free_port}", "--advertise-address", "{node_ip}:{free_port}", "--transfer-hostname", "{node_ip}"]


def start_cluster(config: UpConfig, after_ray_init: Callable[[], None] = lambda: None) -> Cluster:
    """Start everything and wait until it is ready; on any failure, what was started is stopped again.
    ``after_ray_init``: called once Ray is initialised (which installs signal handlers of its own)."""
    import ray

    if not config.ray_address:  # embedded
        # Ray starts at most num_cpus worker processes at once, and prestarts that many: one per process of the
        # cluster lets every actor start at the same time (the actors reserve no CPU; this is not a CPU budget).
        members = 1 + config.num_prefill + config.num_decode + config.num_routers
        ray.init(num_cpus=config.ray_num_cpus or max(os.cpu_count() or 1, members),
                 object_store_memory=config.ray_object_store_mb << 20, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=config.ray_address, log_to_driver=False, configure_logging=False)
    after_ray_init()
    log_dir = config.log_dir or tempfile.mkdtemp(prefix="baton-up-")
    cluster = Cluster(redis_url=config.redis_url, log_dir=log_dir)
    try:
        _start(config, cluster)
    except BaseException:
        stop_cluster(cluster, config.drain_grace_s + _STOP_MARGIN_S)
        raise
    return cluster


def _start(config: UpConfig, cluster: Cluster) -> None:
    import ray

    supervisor = _supervisor_class()
    gpus = config.gpus_per_pod
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def launch(name: str, role: str, num_gpus: float = 0.0) -> Member:
        actor = supervisor.options(num_gpus=num_gpus).remote(name, os.path.join(cluster.log_dir, f"{name}.log"))
        member = Member(name, role, config.host, actor)
        cluster.members.append(member)
        return member

    started = time.monotonic()
    # Every actor is created first (their worker processes start together), then the processes in order.
    redis = None if cluster.redis_url else launch("redis", "redis")
    pods = [launch(f"{role}-{i}", role, num_gpus=gpus)
            for role, count in (("prefill", config.num_prefill), ("decode", config.num_decode)) for i in range(count)]
    routers = [launch(f"router-{i}", "router") for i in range(config.num_routers)]
    if redis is not None:
        redis.argv = ["redis-server", "--port", "{free_port}", "--bind", config.host, "--save", "", "--appendonly",
                      "no", "--protected-mode", "no"]
        _wait([redis], config.ready_timeout_s)
        cluster.redis_url = f"redis://{_reachable(config.host, redis.info['node_ip'])}:{redis.info['port']}/0"
    for member in pods:
        member.argv = _serve_argv(member.role, config, cluster.redis_url, _network_flags(member.role, config))
    for i, member in enumerate(routers):
        member.argv = _serve_argv("router", config, cluster.redis_url, _network_flags("router", config, i))
    _wait(pods + routers, config.ready_timeout_s)
    deadline = time.monotonic() + config.ready_timeout_s
    for router in routers:
        _wait_routed(router, len(pods), config, deadline)
    log.info("cluster ready in %.1f s", time.monotonic() - started)


def _reachable(host: str, node_ip: str) -> str:
    return node_ip if host in ("0.0.0.0", "::", "") else host


def _wait(members: list[Member], timeout_s: float) -> None:
    """Start the members' processes concurrently; each reports its pid, node and ready info."""
    import ray

    refs = [m.actor.start.remote(m.argv, timeout_s) for m in members]
    for member, info in zip(members, ray.get(refs, timeout=timeout_s + 30), strict=True):
        member.info = info
        if "port" in info["ready"]:
            member.info["address"] = f"{_reachable(member.host, info['node_ip'])}:{info['ready']['port']}"


def _wait_routed(router: Member, num_pods: int, config: UpConfig, deadline: float) -> None:
    """Until the router sees every pod and would place a request (its Health over gRPC, TLS if configured)."""
    address = router.info["address"]
    if config.gateway.tls:
        with open(config.gateway.tls_cert_file, "rb") as cert:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read())
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        while True:
            try:
                health = stub.Health(inference_pb2.HealthRequest(), timeout=5)
                if health.serving and sum(w.eligible for w in health.workers) == num_pods:
                    return
            except grpc.RpcError as err:
                log.debug("router %s not answering yet: %s", address, err.code())
            if time.monotonic() > deadline:
                raise RuntimeError(f"router {address} did not see all {num_pods} pods in time")
            time.sleep(0.1)  # polling another process's view: nothing to wait on here
    finally:
        channel.close()


# Beyond a process's own drain grace: its server's last second and exiting.
_STOP_MARGIN_S = 5.0


def stop_cluster(cluster: Cluster, grace_s: float) -> list[int]:
    """Routers, then pods, then Redis, each SIGTERMed and given ``grace_s`` (their drain grace and a margin, so a
    stream in flight finishes); actors killed; an embedded Ray shut down. Returns the pids of this node's cluster
    processes that had to be killed after all that (none, normally)."""
    import ray

    for roles in (("router",), ("prefill", "decode"), ("redis",)):
        group = [m for m in cluster.members if m.role in roles]
        refs = [m.actor.stop.remote(grace_s) for m in group]
        with contextlib.suppress(Exception):  # an actor already dead: its process died with it (pdeathsig)
            ray.get(refs, timeout=grace_s + 10)
        for member in group:
            with contextlib.suppress(Exception):
                ray.kill(member.actor)
    local = socket.gethostname()
    pids = [m.pid for m in cluster.members if m.info and m.info.get("node") == local]
    ray.shutdown()  # embedded: stops Ray itself; on an existing cluster: disconnects (our actors are gone already)
    leftover = [pid for pid in pids if _alive(pid)]
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftover


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for every purpose but its parent's bookkeeping
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def watch(cluster: Cluster, period_s: float = 2.0) -> None:
    """Until a signal: report any process of the cluster that exits (it is not restarted; the others serve on)."""
    import ray

    dead: set[str] = set()
    while True:
        time.sleep(period_s)  # a polling period; SIGINT / SIGTERM interrupt it
        live = [m for m in cluster.members if m.name not in dead]
        try:
            running = ray.get([m.actor.running.remote() for m in live], timeout=30)
        except Exception as err:  # an actor lost with its node: say so, keep watching the rest
            log.warning("could not ask every supervisor: %s", err)
            continue
        for member, up_now in zip(live, running, strict=True):
            if not up_now:
                dead.add(member.name)
                log.error("%s (pid %d) exited; its log: %s", member.name, member.pid, member.info.get("log"))


def print_endpoints(cluster: Cluster, config: UpConfig, elapsed_s: float) -> None:
    endpoints = cluster.endpoints(config.gateway.tls)
    print("BATON_UP " + json.dumps(endpoints), flush=True)
    lines = [f"Baton is up in {elapsed_s:.1f} s: {config.num_routers} router(s), {config.num_prefill} prefill and "
             f"{config.num_decode} decode pod(s) serving {config.model_name!r}"]
    for i, router in enumerate(endpoints["routers"]):
        lines.append(f"  router {i}: OpenAI API {router['http'] or '(off)'}   gRPC {router['grpc']}   "
                     f"metrics {router['metrics']}")
    lines.append(f"  Redis {endpoints['redis']}; prefill {endpoints['prefill']}; decode {endpoints['decode']}")
    lines.append(f"  logs: {endpoints['log_dir']}")
    print("\n".join(lines), flush=True)


def up(config: UpConfig, run: Callable[[Cluster], None] | None = None) -> int:
    """Start the cluster, then ``run(cluster)`` if given, else wait for SIGINT / SIGTERM; always shut it down."""

    def request_stop(signum, frame):
        raise ShutdownRequested(signal.Signals(signum).name)

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, request_stop) for sig in signals}

    def take_signals_back() -> None:  # Ray's core worker replaces SIGTERM's handler with one that aborts
        for sig in signals:
            signal.signal(sig, request_stop)

    cluster = None
    started = time.monotonic()
    try:
        cluster = start_cluster(config, after_ray_init=take_signals_back)
        print_endpoints(cluster, config, time.monotonic() - started)
        if run is not None:
            run(cluster)
        else:
            print("Ctrl-C or SIGTERM stops the cluster.", flush=True)
            watch(cluster)
    except ShutdownRequested as stop:
        print(f"{stop}: stopping the cluster", flush=True)
    finally:
        for sig in previous:  # a second Ctrl-C must not interrupt the shutdown half-way
            signal.signal(sig, signal.SIG_IGN)
        if cluster is not None:
            leftover = stop_cluster(cluster, config.drain_grace_s + _STOP_MARGIN_S)
            if leftover:
                log.warning("killed processes that outlived their actors: %s", leftover)
            print("BATON_DOWN " + json.dumps({"pids": sorted(m.pid for m in cluster.members if m.info),
                                              "killed": leftover}), flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
