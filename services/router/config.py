"""The router process's configuration: one dataclass, flags / ``BATON_*`` env / YAML like the pods'."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.cluster.schema import Keys
from services.common.tls import InternalTLSConfig
from services.gateway.config import GatewayConfig

from .policy import Policy, Weights


@dataclass(frozen=True)
class RouterConfig:
    model: str = field(
        default="tiny-qwen3.5-moe",
        metadata={"help": "HF model directory (tokenizer, vocabulary) or a preset name, as the pods were given"},
    )
    tokenizer: str = field(
        default="",
        metadata={"help": "empty: the model directory's tokenizer.json (a preset's byte tokenizer); 'byte'; or a "
                          "directory with tokenizer.json (must match the pods')"},
    )
    served_model_name: str = field(default="", metadata={"help": "model name the pods register (default: --model)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC, HTTP and metrics servers"})
    port: int = field(default=0, metadata={"help": "gRPC port (0: any free port, printed at start)"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0: any free port)"})
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata={"help": "the cluster's Redis"})
    redis_namespace: str = field(default="baton", metadata={"help": "prefix of every Redis key of this cluster"})
    policy: str = field(
        default="cache_aware", metadata={"help": "cache_aware, round_robin, least_load or session"}
    )
    weight_cache: float = field(
        default=Weights.cache, metadata={"help": "cost per prompt token a worker would compute instead of reusing"}
    )
    weight_queue: float = field(
        default=Weights.queue, metadata={"help": "cost per prompt token already queued on a worker"}
    )
    weight_request: float = field(
        default=Weights.request, metadata={"help": "cost per request running or waiting on a worker (in prompt tokens)"}
    )
    weight_session: float = field(
        default=Weights.session, metadata={"help": "cost per other live conversation placed on a worker (in tokens)"}
    )
    weight_memory: float = field(
        default=Weights.memory,
        metadata={"help": "cost per token of live conversations' histories a placement pushes past a worker's KV "
                          "capacity"},
    )
    session_ttl_s: float = field(
        default=10.0, metadata={"help": "a conversation silent this long after its last answer is taken as over"}
    )
    page_size: int = field(default=16, metadata={"help": "tokens per KV page (must equal the pods')"})
    poll_interval_s: float = field(
        default=0.1, metadata={"help": "period of registry reads and in-flight count exchange"}
    )
    heartbeat_ttl_s: float = field(default=3.0, metadata={"help": "a worker silent this long is dropped"})
    max_attempts: int = field(
        default=3, metadata={"help": "decode pods tried per request (refusals and mid-stream failover)"}
    )
    unavailable_s: float = field(default=2.0, metadata={"help": "a pod whose call failed is skipped this long"})
    retry_after_s: float = field(default=1.0, metadata={"help": "retry hint sent with RESOURCE_EXHAUSTED"})
    gateway: GatewayConfig = field(default_factory=GatewayConfig, metadata={"flatten": True})
    snapshot_retry_s: float = field(default=2.0, metadata={"help": "re-ask for a cache snapshot after this long"})
    # Kubernetes' terminationGracePeriodSeconds must exceed it (plus a few seconds to stop): see README.
    drain_grace_s: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long running streams get to finish before the router stops"}
    )
    health_port: int = field(
        default=-1, metadata={"help": "plaintext port serving only grpc.health.v1, for Kubernetes probes when the gRPC "
                                      "port requires client certificates (-1: none; 0: any free port)"}
    )
    internal_tls: InternalTLSConfig = field(default_factory=InternalTLSConfig)  # calls to the decode pods

    def __post_init__(self) -> None:
        Policy(self.policy)  # raises ValueError naming the bad value
        Keys(self.redis_namespace)
        if self.page_size <= 0 or self.max_attempts <= 0:
            raise ValueError("page_size and max_attempts must be positive")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        if self.session_ttl_s <= 0:
            raise ValueError("session_ttl_s must be positive")
        if self.poll_interval_s <= 0 or self.heartbeat_ttl_s <= 2 * self.poll_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed two poll intervals, both positive")
        self.weights  # noqa: B018  (validates them)

    @property
    def weights(self) -> Weights:
        return Weights(self.weight_cache, self.weight_queue, self.weight_request, self.weight_session,
                       self.weight_memory)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
