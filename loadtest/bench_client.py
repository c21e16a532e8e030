"""How much load one load-test process drives faithfully: the runner against a paced synthetic token source.

    python -m loadtest.bench_client --concurrency 16,64,256 --tok-s 50 --tokens 100 --out client.json

A separate process serves ``baton.v1.Inference`` with a synthetic stream: each request gets ``--tokens``
tokens, one every 1/``--tok-s`` seconds on the stream's own schedule, each response carrying the time it was
sent (CLOCK_MONOTONIC, which every process of one machine shares). The real runner (closed loop, single-turn
requests, every bookkeeping step it does in a run) drives it through a gRPC client that notes, for each chunk,
the delay from the server's send to the runner taking the chunk. That delay is what the load generator
(transport, event loop, bookkeeping) adds to every latency it reports; it is compared in the same run with
the inter-token interval being measured. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from loadtest import generators
from loadtest.clients import GrpcClient, Sampling
from loadtest.runner import RunConfig, run
from loadtest.stats import distribution


def _serve(tok_s: float, conn) -> None:
    import grpc

    from services.common.protos import inference_pb2, inference_pb2_grpc

    class PacedInference(inference_pb2_grpc.InferenceServicer):
        async def Generate(self, request, context):
            n = request.sampling.max_tokens
            start = time.monotonic()
            for i in range(n):
                delay = start + (i + 1) / tok_s - time.monotonic()  # its own schedule: a late wake-up shifts nothing
                if delay > 0:
                    await asyncio.sleep(delay)
                last = i == n - 1
                yield inference_pb2.GenerateResponse(
                    token_ids=[i % 256], text=str(time.monotonic_ns()), finished=last,
                    finish_reason=inference_pb2.FINISH_REASON_LENGTH if last else 0,
                    usage=inference_pb2.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=i + 1))

        async def ModelInfo(self, request, context):
            return inference_pb2.ModelInfoResponse(model="paced-synthetic", vocab_size=512, page_size=16)

    async def main() -> None:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(PacedInference(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await server.wait_for_termination()

    asyncio.run(main())


class TimedClient(GrpcClient):
    """The gRPC client, noting how long each chunk took from the server's send to the runner's hands."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delays_ms: list[float] = []

    async def stream(self, prompt, max_tokens, request_id, session_id=""):
        async for chunk in super().stream(prompt, max_tokens, request_id, session_id):
            self.delays_ms.append((time.monotonic_ns() - int(chunk.text)) / 1e6)
            chunk.text = ""
            yield chunk


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["levels"]
    offered = [lv["offered_tok_s"] for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for q in ("p50", "p99"):
        axes[0].plot(offered, [lv["delivery_delay_ms"][q] for lv in levels], "o-", label=f"delivery delay {q}")
    axes[0].plot(offered, [lv["loop_lag_ms"]["p99"] for lv in levels], "x--", label="event-loop lag p99")
    axes[0].set_ylabel("ms")
    for q in ("p50", "p99"):
        axes[1].plot(offered, [lv["itl_over_interval"][q] for lv in levels], "o-", label=f"measured ITL {q}")
    axes[1].axhline(1.0, color="grey", linestyle=":", label="paced interval")
    axes[1].set_ylabel("measured ITL / paced interval")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("offered tokens / s (streams x per-stream rate)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"one load-test process against a paced source ({results['tok_s']:g} tok/s per stream)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def bench_level(port: int, concurrency: int, args: argparse.Namespace, workdir: Path) -> dict:
    workload = generators.shared_prefix(concurrency * args.rounds, 512, system_prompts=1, system_prompt_tokens=64,
                                        user_tokens=64, output_tokens=args.tokens, jitter=0.0)
    config = RunConfig(workload="(in memory)", target=f"127.0.0.1:{port}", concurrency=(concurrency,),
                       progress=False, out=str(workdir / f"c{concurrency}.json"))
    client = TimedClient(config.target, Sampling(), channels=config.grpc_channels)
    results = await run(config, workload, client)
    [level] = results["levels"]
    summary = level["summary"]
    interval = 1 / args.tok_s
    itl = summary["itl_s"]
    return {
        "concurrency": concurrency, "offered_tok_s": concurrency * args.tok_s,
        "delivered_tok_s": summary["throughput"]["output_tok_s"], "errors": summary["errors"],
        "delivery_delay_ms": distribution(client.delays_ms, (50, 90, 99, 100)),
        "loop_lag_ms": level["client_loop_lag_ms"],
        "itl_over_interval": {q: itl[q] / interval for q in ("p50", "p90", "p99")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="16,64,256")
    parser.add_argument("--tok-s", type=float, default=50.0, help="per-stream token rate of the source")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream slot")
    parser.add_argument("--out", default="client.json")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.tok_s, child), daemon=True)
    server.start()
    try:
        port = parent.recv()
        results = {"benchmark": "load-test client capacity", "tok_s": args.tok_s, "tokens": args.tokens,
                   "cpus": mp.cpu_count(), "load_average_before": os.getloadavg()[0], "levels": []}
        with tempfile.TemporaryDirectory() as workdir:
            for c in (int(x) for x in args.concurrency.split(",")):
                level = asyncio.run(bench_level(port, c, args, Path(workdir)))
                results["levels"].append(level)
                d, itl = level["delivery_delay_ms"], level["itl_over_interval"]
                print(f"c={c:>5} offered {level['offered_tok_s']:>8.0f} tok/s, delivered "
                      f"{level['delivered_tok_s']:>8.0f}; delay p50 {d['p50']:6.2f} p99 {d['p99']:7.2f} "
                      f"max {d['p100']:7.2f} ms; loop lag p99 {level['loop_lag_ms']['p99']:6.2f} ms; "
                      f"ITL p50/p99 {itl['p50']:.2f}/{itl['p99']:.2f} x interval", flush=True)
        results["load_average_after"] = os.getloadavg()[0]  # other work on the machine skews the delays
    finally:
        server.terminate()
        server.join(timeout=30)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
