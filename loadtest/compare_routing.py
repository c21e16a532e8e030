"""The same agentic workload through two routers of one local cluster, `cache_aware` and `round_robin`, in one
run: what placement is worth in prompt tokens served from cache, measured by the load runner.

    python -m loadtest.compare_routing --out loadtest/results/routing_cpu.json

Starts `baton up` (tiny random model on CPU: 1 prefill + 2 decode pods, Redis, a `cache_aware` router), adds a
`round_robin` router on the same Redis, sends the workload through each (fresh tokens for the second, same
shape, so it cannot hit what the first left in the caches), prints both tables and the comparison, writes
both results (JSON) and the plots, and stops everything. A few minutes on 2 cores; not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest import report

TINY = ["--model", "tiny-qwen3.5-moe", "--load-format", "dummy", "--device", "cpu", "--dtype", "float32"]


def _baton(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], stdout=subprocess.PIPE, text=True,
                            bufsize=1, **kwargs)


def _wait_line(proc: subprocess.Popen, prefix: str) -> dict:
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith(prefix):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"the process ended before printing {prefix}")


def _loadtest(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "loadtest", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--first-turn-tokens", type=int, default=1500)
    parser.add_argument("--num-pages", type=int, default=3000, help="KV pages per pod (16 tokens each)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/routing_cpu.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="routing-"))
    workload = work / "agentic.jsonl"
    _loadtest("generate", "agentic", "--conversations", str(args.conversations), "--first-turn-tokens",
              str(args.first_turn_tokens), "--follow-ups", "3:4", "--turn-tokens", "100", "--output-tokens", "24",
              "--think-time-s", "0.3", "--vocab-size", "512", "--out", str(workload))
    pods = [*TINY, "--num-pages", str(args.num_pages), "--prefill-chunk-size", "512",
            "--max-num-batched-tokens", "1024"]
    up = _baton("up", *pods, "--num-prefill", "1", "--num-decode", "2", "--log-dir",
                str(work / "logs"))
    extra = None
    try:
        cluster = _wait_line(up, "BATON_UP ")
        extra = _baton("serve", "router", "--model", "tiny-qwen3.5-moe", "--policy", "round_robin", "--redis-url",
                       cluster["redis"])
        round_robin = _wait_line(extra, "BATON_READY ")
        targets = {"cache_aware": cluster["routers"][0]["grpc"], "round_robin": f"127.0.0.1:{round_robin['port']}"}
        results = {}
        for salt, (policy, target) in enumerate(targets.items(), start=1):
            out = args.out.with_name(f"{args.out.stem}_{policy}.json")
            _loadtest("run", "--workload", str(workload), "--target", target, "--concurrency", str(args.concurrency),
                      "--salt", str(salt), "--no-progress", "--out", str(out))
            results[policy] = json.loads(out.read_text())
        for policy, result in results.items():
            print(report.table(result, policy))
        print(report.compare(results["cache_aware"], results["round_robin"], "cache_aware", "round_robin"))
        runs = list(results.items())
        for path in report.plot(runs, args.out.with_suffix("")):
            print(f"wrote {path}")
        summary = {policy: _cached(result) for policy, result in results.items()}
        args.out.write_text(json.dumps({"workload": str(workload), "cached": summary}, indent=2))
        for policy, figures in summary.items():
            print(f"{policy}: {figures['cached']}/{figures['reusable']} reusable prompt tokens served from cache "
                  f"({figures['cached'] / max(figures['reusable'], 1):.1%}), {figures['cached']}/"
                  f"{figures['prompt']} of all prompt tokens")
        print(f"wrote {args.out}")
    finally:
        for proc in (extra, up):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=120)


def _cached(result: dict) -> dict:
    requests = [r for level in result["levels"] for r in level["requests"] if r.get("cached_tokens") is not None]
    return {"prompt": sum(r["prompt_tokens"] for r in requests),
            "reusable": sum(r["reusable_tokens"] or 0 for r in requests),
            "cached": sum(min(r["cached_tokens"], r["reusable_tokens"] or 0) for r in requests)}


if __name__ == "__main__":
    main()
