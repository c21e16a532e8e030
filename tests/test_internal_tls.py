"""Internal gRPC over mutual TLS: a router, a decode pod and a prefill pod (real processes, a real redis-server)
with certificates from a test CA. A request needing a remote prefill crosses both internal hops (router -> decode,
decode -> prefill) and matches the single-process engine's greedy output; a plaintext client, a TLS client without
a certificate and one with a certificate from another CA are all refused by the pods."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.protos import inference_pb2, inference_pb2_grpc
from services.engine.request import SamplingParams
from tests.helpers import cpu_engine
from tests.pods import Pod, RedisServer, wait_until
from tests.test_pd_cluster import PAGE, THRESHOLD, engine_flags
from tests.tls_certs import make_ca, make_cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("internal-tls")
    ca = make_ca(directory)
    return {"ca": ca[0], "prefill": make_cert(directory, ca, "prefill"), "decode": make_cert(directory, ca, "decode"),
            "router": make_cert(directory, ca, "router", server=False),
            "stranger": make_cert(directory, make_ca(directory, "other-ca"), "stranger", server=False)}


def _tls_flags(cert_key, ca, mutual: bool = True) -> list[str]:
    flags = ["--internal-tls-cert-file", str(cert_key[0]), "--internal-tls-key-file", str(cert_key[1]),
             "--internal-tls-ca-file", str(ca)]
    return flags + (["--internal-tls-require-client-cert", "true"] if mutual else [])


def _secure_channel(address: str, ca, cert_key=None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=cert_key[1].read_bytes() if cert_key else None,
        certificate_chain=cert_key[0].read_bytes() if cert_key else None,
    )
    return grpc.secure_channel(address, credentials)


def _health(channel: grpc.Channel) -> inference_pb2.HealthResponse:
    return inference_pb2_grpc.InferenceStub(channel).Health(inference_pb2.HealthRequest(), timeout=10)


def test_router_decode_prefill_over_mutual_tls(tiny_checkpoint, certs):
    ca = certs["ca"]
    server = RedisServer()
    started: list[Pod] = []
    try:
        # Kubernetes' probes present no client certificate: mTLS pods answer them on a plaintext health port.
        prefill = Pod("prefill", *engine_flags(tiny_checkpoint), "--redis-url", server.url,
                      *_tls_flags(certs["prefill"], ca), "--health-port", "0")
        started.append(prefill)
        decode = Pod("decode", *engine_flags(tiny_checkpoint), "--redis-url", server.url,
                     *_tls_flags(certs["decode"], ca), "--health-port", "0")
        started.append(decode)
        # The router's public port stays plaintext here; its calls to the pods use TLS with its client certificate.
        router = Pod("router", "--model", tiny_checkpoint, "--tokenizer", "byte", "--page-size", str(PAGE),
                     "--redis-url", server.url, "--poll-interval-s", "0.05", *_tls_flags(certs["router"], ca, False))
        started.append(router)
        wait_until(lambda: sum(w.eligible for w in router.health().workers) == 2, what="the router to see 2 pods")

        # Long enough for a remote prefill: router -> decode and decode -> prefill, both over mutual TLS.
        prompt = list(range(7, 7 + THRESHOLD + 12))
        call = router.inference.Generate(inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompt),
            sampling=inference_pb2.SamplingParams(max_tokens=10, temperature=0.0)), timeout=120)
        out = [t for response in call for t in response.token_ids]
        engine = cpu_engine(tiny_checkpoint, page_size=PAGE, num_pages=700, max_num_seqs=40, prefill_chunk_size=64,
                            max_num_batched_tokens=512)
        assert out == engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
        assert decode.metrics()['baton_remote_prefills_total{outcome="ok"}'] == 1

        for pod in (decode, prefill):
            # A caller with a certificate from the CA: served, including the standard health service.
            with _secure_channel(pod.address, ca, certs["router"]) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            # Refused: plaintext, TLS without a client certificate, a certificate from another CA.
            refused = [grpc.insecure_channel(pod.address), _secure_channel(pod.address, ca),
                       _secure_channel(pod.address, ca, certs["stranger"])]
            for channel in refused:
                with channel, pytest.raises(grpc.RpcError) as err:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # The plaintext health port: the standard health service and nothing else.
            with grpc.insecure_channel(f"127.0.0.1:{pod.info['health_port']}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.RpcError) as err:
                    _health(channel)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with _secure_channel(decode.address, ca, certs["router"]) as channel:  # the router named it; TLS to it
            assert [(p.address, p.usable) for p in _health(channel).prefill_peers] == [(prefill.address, True)]
    finally:
        for pod in reversed(started):
            pod.stop()
        server.stop()
