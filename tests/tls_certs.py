"""Certificates for the TLS tests, made with the ``openssl`` command line as the public-port TLS test does
(tests/test_gateway.py): a CA, and certificates it signs for 127.0.0.1 / localhost (servers) or a client name."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str = "baton-test-ca") -> tuple[Path, Path]:
    """A self-signed CA: (cert, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(key), "-out", str(cert))
    return cert, key


def make_cert(directory: Path, ca: tuple[Path, Path], name: str, server: bool = True) -> tuple[Path, Path]:
    """A certificate signed by ``ca``: (cert, key). Servers get 127.0.0.1 and localhost as subject alternative
    names (what the tests dial); both kinds may be used as client certificates (mutual TLS)."""
    cert, key, request = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment",
             "extendedKeyUsage=serverAuth,clientAuth"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key),
             "-out", str(request))
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "1", "-extfile", str(extensions), "-out", str(cert))
    return cert, key
