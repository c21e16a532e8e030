"""``baton up``'s configuration: one dataclass, from flags, ``BATON_*`` env or one YAML file like the pods'. The
engine settings apply to every pod; the gateway settings (HTTP port, API keys, TLS) to the routers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services.engine.config import EngineConfig
from services.gateway.config import GatewayConfig
from services.router.policy import Policy


@dataclass(frozen=True)
class UpConfig:
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"flatten": True})
    gateway: GatewayConfig = field(default_factory=GatewayConfig, metadata={"flatten": True})
    num_prefill: int = field(default=1, metadata={"help": "prefill pods"})
    num_decode: int = field(default=1, metadata={"help": "decode pods"})
    num_routers: int = field(default=1, metadata={"help": "router replicas (each serves gRPC and HTTP)"})
    served_model_name: str = field(default="", metadata={"help": "model name clients use (default: --model)"})
    policy: str = field(default="cache_aware", metadata={"help": "the routers' placement policy"})
    redis_url: str = field(default="", metadata={"help": "the cluster's Redis (empty: start a redis-server actor)"})
    ray_address: str = field(
        default="", metadata={"help": "existing Ray cluster (host:port or auto); empty: an embedded local Ray"}
    )
    ray_num_cpus: int = field(default=0, metadata={"help": "embedded Ray: CPUs it may schedule (0: all)"})
    ray_object_store_mb: int = field(
        default=80, metadata={"help": "embedded Ray: object store size (Baton passes no data through it)"}
    )
    gpus_per_pod: float = field(
        default=-1.0, metadata={"help": "GPUs each pod reserves (-1: 1 where the Ray cluster has GPUs, else 0)"}
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address every process binds; 0.0.0.0 on a multi-node cluster (they advertise their node)"},
    )
    router_port: int = field(default=0, metadata={"help": "gRPC port of the first router (0: any free port)"})
    pod_args: str = field(default="", metadata={"help": "extra flags for every pod, e.g. '--transfer-protocol rdma'"})
    router_args: str = field(default="", metadata={"help": "extra flags for every router"})
    drain_grace_s: float = field(
        default=30.0, metadata={"help": "on shutdown, how long every process may take to finish its streams"}
    )
    ready_timeout_s: float = field(default=300.0, metadata={"help": "how long every process may take to be ready"})
    log_dir: str = field(default="", metadata={"help": "each process's output (default: a new temporary directory)"})

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_routers < 1 or self.num_prefill < 0:
            raise ValueError("need at least 1 decode pod and 1 router (and 0 or more prefill pods)")
        Policy(self.policy)
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        if self.ray_object_store_mb < 75:
            raise ValueError("ray_object_store_mb must be at least 75 (Ray's minimum)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model

    def engine_flags(self) -> list[str]:
        """The engine settings that differ from the defaults, as ``baton serve`` flags."""
        flags = []
        defaults = EngineConfig()
        for f in dataclasses.fields(EngineConfig):
            value = getattr(self.engine, f.name)
            if value != getattr(defaults, f.name) or f.name == "model":
                flags += ["--" + f.name.replace("_", "-"), str(value)]
        return flags

    def gateway_flags(self) -> list[str]:
        flags = []
        defaults = GatewayConfig()
        for f in dataclasses.fields(GatewayConfig):
            value = getattr(self.gateway, f.name)
            if value != getattr(defaults, f.name):
                flags += ["--" + f.name.replace("_", "-"), str(value)]
        return flags
