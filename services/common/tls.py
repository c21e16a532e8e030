"""TLS for the internal gRPC calls (router -> decode pods, decode pods -> prefill pods): one config, used by
every process for both its server port and its client channels.

- A pod with ``cert_file`` + ``key_file`` serves its gRPC port over TLS; with ``require_client_cert`` it also
  asks every caller for a certificate signed by ``ca_file`` (mutual TLS).
- A process with ``ca_file`` calls the pods over TLS, checking their certificates against that CA, and presents
  its own ``cert_file`` + ``key_file`` as its client certificate when it has them (needed by mTLS pods).

The public ports (the router's gRPC and HTTP APIs) have their own settings (services/gateway/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

# Reconnect quickly after a pod restarts (gRPC's default backoff grows to two minutes).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))


@dataclass(frozen=True)
class InternalTLSConfig:
    cert_file: str = field(
        default="", metadata={"help": "PEM certificate (chain) of this process: its gRPC port serves TLS with it, "
                                      "and it is the client certificate of its calls to pods"}
    )
    key_file: str = field(default="", metadata={"help": "PEM private key of cert_file"})
    ca_file: str = field(
        default="", metadata={"help": "PEM CA bundle: calls to pods use TLS and verify the pods' certificates with "
                                      "it (and, with require_client_cert, this pod verifies its callers')"}
    )
    require_client_cert: bool = field(
        default=False, metadata={"help": "mutual TLS: refuse callers without a certificate signed by ca_file"}
    )
    server_name: str = field(
        default="", metadata={"help": "name checked in the pods' certificates (default: the host of the address "
                                      "dialled; set it when pods are dialled by IP and certified by name)"}
    )

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("internal TLS needs both cert_file and key_file")
        if self.require_client_cert and not (self.cert_file and self.ca_file):
            raise ValueError("require_client_cert needs cert_file, key_file and ca_file")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"internal TLS {name}: no such file {path!r}")

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert_file)

    @property
    def calls_tls(self) -> bool:
        return bool(self.ca_file)


def bind(server: grpc.aio.Server, address: str, config: InternalTLSConfig) -> int:
    """Add ``address`` to ``server``, over TLS when ``config`` has a certificate; returns the bound port."""
    if not config.serves_tls:
        return server.add_insecure_port(address)
    key, cert = Path(config.key_file).read_bytes(), Path(config.cert_file).read_bytes()
    ca = Path(config.ca_file).read_bytes() if config.require_client_cert else None
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                              require_client_auth=config.require_client_cert)
    return server.add_secure_port(address, credentials)


def channel(address: str, config: InternalTLSConfig) -> grpc.aio.Channel:
    """A channel to a pod: TLS verified against ``ca_file`` when set (with this process's certificate as the
    client's), plaintext otherwise."""
    options = list(RECONNECT_OPTIONS)
    if not config.calls_tls:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(config.ca_file).read_bytes(),
        private_key=Path(config.key_file).read_bytes() if config.cert_file else None,
        certificate_chain=Path(config.cert_file).read_bytes() if config.cert_file else None,
    )
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)
