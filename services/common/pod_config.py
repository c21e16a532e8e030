"""Settings every pod process has: its engine, its Mooncake transfer engine, and where it listens."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.cluster.publisher import ClusterConfig
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
