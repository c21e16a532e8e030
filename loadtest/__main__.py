"""``python -m loadtest``: generate workloads, run them against a server, report the results.

    python -m loadtest generate agentic --conversations 64 --vocab-size 248320 --out agentic.jsonl
    python -m loadtest generate shared-prefix --requests 2000 --system-prompts 8 --out shared.jsonl
    python -m loadtest generate subagents --trees 8 --subagents 8 --out subagents.jsonl
    python -m loadtest generate mooncake --trace conversation_trace.jsonl --out mooncake.jsonl
    python -m loadtest export-mooncake agentic.jsonl --out agentic_trace.jsonl
    python -m loadtest run --workload agentic.jsonl --api grpc --target 10.0.0.6:50051 --concurrency 1,8,32 \\
        --metrics-url http://10.0.0.6:9100/metrics --out results/agentic.json
    python -m loadtest run --workload agentic.jsonl --api openai --target http://peer:8000 --return-token-ids \\
        --concurrency 1,8,32 --out results/agentic_peer.json
    python -m loadtest report results/agentic.json results/agentic_peer.json --labels baton,peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from loadtest import generators, report
from loadtest.runner import RunConfig, RunError, run
from loadtest.workload import WorkloadError, load


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="write a workload JSONL").add_subparsers(dest="kind", required=True)

    def common(p, think: float | None = None) -> None:
        p.add_argument("--out", required=True)
        p.add_argument("--vocab-size", type=int, default=248320, help="token ids are drawn from [0, this)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--jitter", type=float, default=0.2, help="lengths drawn from x(1 +- jitter)")
        p.add_argument("--output-tokens", type=int, default=300)
        if think is not None:
            p.add_argument("--think-time-s", type=float, default=think, help="mean (exponential) between turns")

    p = gen.add_parser("agentic", help="multi-turn agent conversations (TokenSpeed's agentic shape)")
    common(p, think=5.0)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--first-turn-tokens", type=int, default=50_000)
    p.add_argument("--follow-ups", type=_range, default=(10, 15), help="follow-up turns per conversation, MIN:MAX")
    p.add_argument("--turn-tokens", type=int, default=800, help="new tokens per follow-up (tool output)")
    p.add_argument("--system-prompt-tokens", type=int, default=0, help="shared by every conversation")

    p = gen.add_parser("shared-prefix", help="single-turn requests behind a few shared system prompts")
    common(p)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-prompt-tokens", type=int, default=4000)
    p.add_argument("--user-tokens", type=int, default=400)
    p.add_argument("--zipf", type=float, default=0.0, help="popularity skew of the system prompts (0: uniform)")

    p = gen.add_parser("subagents", help="sub-agents branching from one long orchestrator context")
    common(p, think=2.0)
    p.add_argument("--trees", type=int, default=8)
    p.add_argument("--context-tokens", type=int, default=40_000)
    p.add_argument("--subagents", type=int, default=8)
    p.add_argument("--task-tokens", type=int, default=500)
    p.add_argument("--subagent-turns", type=int, default=3)
    p.add_argument("--turn-tokens", type=int, default=800)

    p = gen.add_parser("mooncake", help="a Mooncake-format trace (FAST'25 release, tool-agent trace) as a workload")
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=248320)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--trace-key", default="mooncake", help="names the block tokens: another key, other tokens")
    p.add_argument("--limit", type=int, help="first N records only")


def cmd_generate(args: argparse.Namespace) -> int:
    common = {"jitter": args.jitter, "seed": args.seed, "output_tokens": args.output_tokens} \
        if args.kind != "mooncake" else {}
    if args.kind == "agentic":
        workload = generators.agentic(
            args.conversations, args.vocab_size, first_turn_tokens=args.first_turn_tokens, follow_ups=args.follow_ups,
            turn_tokens=args.turn_tokens, think_time_s=args.think_time_s,
            system_prompt_tokens=args.system_prompt_tokens, **common)
    elif args.kind == "shared-prefix":
        workload = generators.shared_prefix(
            args.requests, args.vocab_size, system_prompts=args.system_prompts,
            system_prompt_tokens=args.system_prompt_tokens, user_tokens=args.user_tokens, zipf=args.zipf, **common)
    elif args.kind == "subagents":
        workload = generators.subagents(
            args.trees, args.vocab_size, context_tokens=args.context_tokens, subagents_per_tree=args.subagents,
            task_tokens=args.task_tokens, subagent_turns=args.subagent_turns, turn_tokens=args.turn_tokens,
            think_time_s=args.think_time_s, **common)
    else:
        workload = generators.from_mooncake(args.trace, args.vocab_size, block_size=args.block_size,
                                            trace_key=args.trace_key, limit=args.limit)
    workload.save(args.out)
    turns = sum(len(s.turns) for s in workload.sessions)
    new_tokens = sum(t.new_tokens for s in workload.sessions for t in s.turns)
    print(f"{args.out}: {workload.kind}, {len(workload.sessions)} sessions, {turns} requests, "
          f"{new_tokens} new prompt tokens")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    count = generators.to_mooncake(load(args.workload), args.out, block_size=args.block_size, salt=args.salt)
    print(f"{args.out}: {count} records")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="send a workload to a server and measure")
    p.add_argument("--workload", required=True)
    p.add_argument("--api", choices=("grpc", "openai"), default="grpc")
    p.add_argument("--target", required=True, help="host:port (grpc) or base URL http://host:port (openai)")
    p.add_argument("--model", default="", help="OpenAI model name (default: the first of /v1/models)")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=_ints, default=(8,), help="closed loop, comma-separated sweep")
    p.add_argument("--rate", type=_floats, default=(), help="open loop: conversations/s, comma-separated sweep "
                   "(none: the trace's timestamps)")
    p.add_argument("--speedup", type=float, default=1.0, help="trace timestamps are divided by this")
    p.add_argument("--think-time-scale", type=float, default=1.0)
    p.add_argument("--max-sessions", type=int)
    p.add_argument("--max-duration-s", type=float)
    p.add_argument("--ramp-s", type=float, default=0.0,
                   help="closed loop: start the conversation slots spread over this many seconds; the summary "
                   "counts requests started after it")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--prompt-format", choices=("ids", "text"), default="ids")
    p.add_argument("--tokenizer", help="tokenizer.json or a model directory holding it")
    p.add_argument("--return-token-ids", action="store_true", help="OpenAI: ask for answers' ids (vLLM)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", help="OpenAI bearer token")
    p.add_argument("--metrics-url", dest="metrics_urls", action="append", default=[],
                   help="a server's Prometheus /metrics URL (repeat per pod)")
    p.add_argument("--scrape-interval-s", type=float, default=0.5)
    p.add_argument("--salt", type=int, default=0, help="fresh tokens (same structure) for a re-run on a warm server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-block", type=int, default=0,
                   help="tokens per block of the reusable-prefix accounting (default: the server's page size, else 16)")
    p.add_argument("--decode-floor-tok-s", type=float, default=70.0)
    p.add_argument("--grpc-channels", type=int, default=4)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--record-trace", help="also write the requests sent as a Mooncake trace")
    p.add_argument("--out", default="loadtest.json")


def cmd_run(args: argparse.Namespace) -> int:
    fields = dict(vars(args))
    fields["metrics_urls"] = tuple(fields["metrics_urls"])
    config = RunConfig(**fields)
    workload = load(config.workload)
    results = asyncio.run(run(config, workload))
    print(report.table(results))
    for path in report.plot([("", results)], Path(config.out).with_suffix("")):
        print(f"wrote {path}")
    print(f"wrote {config.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    runs = []
    labels = args.labels.split(",") if args.labels else [Path(p).stem for p in args.results]
    if len(labels) != len(args.results):
        raise SystemExit("--labels needs one label per results file")
    for label, path in zip(labels, args.results, strict=True):
        runs.append((label, json.loads(Path(path).read_text())))
        print(report.table(runs[-1][1], label))
    for label, results in runs[1:]:
        print(report.compare(runs[0][1], results, runs[0][0], label))
    stem = Path(args.out_stem) if args.out_stem else Path(args.results[0]).with_suffix("")
    for path in report.plot(runs if len(runs) > 1 else [("", runs[0][1])], stem):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    p = sub.add_parser("export-mooncake", help="write a workload as a Mooncake-format trace")
    p.add_argument("workload")
    p.add_argument("--out", required=True)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--salt", type=int, default=0)
    _add_run(sub)
    p = sub.add_parser("report", help="tables, ratios and plots of one or more results files")
    p.add_argument("results", nargs="+")
    p.add_argument("--labels", help="comma-separated, one per results file")
    p.add_argument("--out-stem", help="plots go to <stem>_<plot>.png (default: the first results file's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s")
    command = args.command
    del args.command, args.log_level
    try:
        if command == "generate":
            try:
                return cmd_generate(args)
            except ValueError as err:  # sizes that do not fit together
                print(f"error: {err}", file=sys.stderr)
                return 2
        if command == "export-mooncake":
            return cmd_export(args)
        if command == "run":
            return cmd_run(args)
        return cmd_report(args)
    except (RunError, WorkloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
