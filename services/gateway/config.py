"""Settings of the public endpoints (the router's gRPC API and its OpenAI-compatible HTTP API): the HTTP port,
who may call (API keys), TLS. Part of the router's one config (flattened: ``--http-port``, ``--api-keys``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GatewayConfig:
    http_port: int = field(
        default=0, metadata={"help": "OpenAI-compatible HTTP port (0: any free port, printed at start; -1: none)"}
    )
    api_keys: str = field(
        default="", metadata={"help": "comma-separated API keys; when set (or api_key_file), every call needs one",
                              "secret": True}
    )
    api_key_file: str = field(default="", metadata={"help": "file with one API key per line"})
    tls_cert_file: str = field(default="", metadata={"help": "PEM certificate (chain): serve gRPC and HTTP over TLS"})
    tls_key_file: str = field(default="", metadata={"help": "PEM private key of tls_cert_file"})
    max_body_mb: int = field(default=64, metadata={"help": "largest HTTP request body (a 128K-token prompt as ids)"})

    def __post_init__(self) -> None:
        if self.http_port < -1:
            raise ValueError(f"http_port must be -1 (off), 0 (any) or a port, got {self.http_port}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        for name in ("api_key_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path!r}")
        if self.max_body_mb <= 0:
            raise ValueError("max_body_mb must be positive")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def load_api_keys(self) -> frozenset[str]:
        """Every accepted key (empty: no key needed)."""
        keys = [k.strip() for k in self.api_keys.split(",")]
        if self.api_key_file:
            keys += [line.strip() for line in Path(self.api_key_file).read_text().splitlines()]
        return frozenset(k for k in keys if k and not k.startswith("#"))
