"""``baton up`` as a user runs it: one command starts an embedded Ray, Redis, a router and the pods (Ray actors
supervising them); the cluster serves through its OpenAI and gRPC APIs; SIGTERM stops everything, and no process of
it (Ray's own included) is left, checked by pid."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import openai
import pytest

from services.common.protos import inference_pb2, inference_pb2_grpc
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.request import SamplingParams

MODEL = ["--model", "tiny-qwen3.5-moe", "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
         "--num-pages", "1000", "--max-num-seqs", "8"]


def _descendants(root: int) -> set[int]:
    """Every live process under ``root`` (from /proc: parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def reference():
    engine = Engine(EngineConfig(model="tiny-qwen3.5-moe", load_format="dummy", device="cpu", dtype="float32",
                                 num_pages=1000, max_num_seqs=8))

    def expected(prompt: list[int], max_tokens: int) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0].token_ids

    return expected


def test_baton_up_serves_and_sigterm_leaves_no_process(reference, tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", *MODEL, "--num-prefill", "1", "--num-decode", "1",
         "--remote-prefill-threshold", "64", "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
    )
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            output.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def wait_for(prefix: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                proc.kill()
                raise AssertionError(f"baton up never printed {prefix}:\n" + "\n".join(output[-40:]))
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])

    started = time.monotonic()
    try:
        up = wait_for("BATON_UP ", timeout=240)
        print(f"baton up ready in {time.monotonic() - started:.1f} s: {up}")
        cluster_pids = _descendants(proc.pid)
        assert set(up["pids"].values()) <= cluster_pids, "pods, router and Redis run under baton up's Ray"
        assert len(cluster_pids) > len(up["pids"]), "Ray's own processes are there too"

        # Served: a completion over HTTP (a prompt long enough for the prefill pod), a chat turn, a gRPC stream.
        [router] = up["routers"]
        client = openai.OpenAI(base_url=router["http"], api_key="none", max_retries=0, timeout=120)
        prompt = list(range(97, 123)) * 4  # 104 byte tokens
        out = client.completions.create(model="tiny-qwen3.5-moe", prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"return_token_ids": True})
        assert out.choices[0].model_extra["token_ids"] == reference(prompt, 6)
        chat = client.chat.completions.create(model="tiny-qwen3.5-moe", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "hello"}])
        assert chat.usage.prompt_tokens == len(b"<user>hello\n<assistant>")
        assert chat.choices[0].finish_reason in ("stop", "length")
        with grpc.insecure_channel(router["grpc"]) as channel:
            request = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=prompt[:20]),
                                                    sampling=inference_pb2.SamplingParams(max_tokens=5,
                                                                                          temperature=0))
            responses = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
        assert [t for r in responses for t in r.token_ids] == reference(prompt[:20], 5)

        cluster_pids |= _descendants(proc.pid)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        down = wait_for("BATON_DOWN ", timeout=90)
        assert proc.wait(timeout=60) == 0
        print(f"stopped in {time.monotonic() - stopping:.1f} s; {len(cluster_pids)} processes checked")
        assert down["killed"] == [], "every process stopped with its actor, none needed killing"
        deadline = time.monotonic() + 10
        while (left := [p for p in cluster_pids if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)  # reaping by init after their parents exited: observable only by polling
        assert left == [], f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_one_yaml_file_sets_every_process(tmp_path):
    """Settings from one YAML file (or flags): engine settings reach every pod, gateway settings every router; only
    the first router takes fixed ports; on all interfaces pods advertise their node's address."""
    from services.common.config import config_from
    from services.launch.config import UpConfig
    from services.launch.up import _network_flags, _serve_argv

    path = tmp_path / "cluster.yaml"
    path.write_text("model: /models/qwen\npage_size: 32\nnum_decode: 3\nhttp_port: 8000\napi_keys: a,b\n"
                    "pod_args: --transfer-protocol rdma\nhost: 0.0.0.0\ndrain_grace_s: 12\n")
    config = config_from(UpConfig, {"num_prefill": 2}, env={}, yaml_path=str(path))
    assert (config.num_prefill, config.num_decode, config.engine.page_size) == (2, 3, 32)
    pod = _serve_argv("decode", config, "redis://r:1/0", _network_flags("decode", config))
    flags = dict(zip(pod[5::2], pod[6::2], strict=False))
    assert flags["--model"] == "/models/qwen" and flags["--page-size"] == "32" and flags["--redis-url"] == "redis://r:1/0"
    assert flags["--transfer-protocol"] == "rdma" and flags["--host"] == "0.0.0.0"
    assert flags["--advertise-address"] == "{node_ip}:{free_port}", "filled in on the pod's node"
    assert float(flags["--drain-grace-s"]) == 12, "baton up waits this (and a margin) before it kills a process"
    first, second = (_serve_argv("router", config, "redis://r:1/0", _network_flags("router", config, i))
                     for i in (0, 1))
    assert first[first.index("--http-port") + 1] == "8000" and second[-1] == "0" and second[-2] == "--http-port"
    assert first[first.index("--api-keys") + 1] == "a,b"
    assert float(first[first.index("--drain-grace-s") + 1]) == 12
    with pytest.raises(ValueError, match="at least 1 decode pod"):
        UpConfig(num_decode=0)
