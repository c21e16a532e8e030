"""Settings every pod process has: its engine, its Mooncake transfer engine, where it listens, how it drains
and its internal TLS."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.cluster.publisher import ClusterConfig
from services.common.tls import InternalTLSConfig
from services.engine.config import EngineConfig
from services.transfer.engine import TransferConfig


@dataclass(frozen=True)
class PodConfig:
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"flatten": True})
    transfer: TransferConfig = field(default_factory=TransferConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"flatten": True})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC and metrics servers"})
    port: int = field(default=0, metadata={"help": "gRPC port (0: any free port, printed at start)"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0: any free port)"})
    # Kubernetes' terminationGracePeriodSeconds must exceed it (plus a few seconds to stop): see README.
    drain_grace_s: float = field(
        default=30.0, metadata={"help": "on SIGTERM, how long running requests get to finish before the pod stops"}
    )
    health_port: int = field(
        default=-1, metadata={"help": "plaintext port serving only grpc.health.v1, for Kubernetes probes when the gRPC "
                                      "port requires client certificates (-1: none; 0: any free port)"}
    )
    internal_tls: InternalTLSConfig = field(default_factory=InternalTLSConfig)

    def __post_init__(self) -> None:
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
