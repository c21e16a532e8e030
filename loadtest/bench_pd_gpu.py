"""A prefill pod and a decode pod on one GPU: greedy output against the single-process engine, the time to first
token split into its parts, and (optionally) the agentic floor metric through the load-test harness.

    python -m loadtest.bench_pd_gpu --model qwen3.5-35b-a3b:20 --lengths 8192,32768 --reps 3 \\
        --out loadtest/results/pd_gpu_h200.json
    # plus the floor metric (issue 24): a closed-loop agentic sweep against the pair
    python -m loadtest.bench_pd_gpu ... --floor-concurrency 16,32,48,64 --floor-first-turn 8192

What it does, in order (each step in its own process, so GPU memory is freed between them):

1. Reference: one ``Engine`` in a child process (the same engine settings as the pods: chunked prefill, prefix
   cache, CUDA graphs) generates ``--max-tokens`` greedy tokens for every prompt, one prompt at a time, after one
   untimed prompt of each length (compiles the new shapes). Per prompt it records the tokens, the time to first
   token (``add_request`` to the step that returns it) and the first decode step (first to second token).
2. The pair: ``baton serve prefill`` and ``baton serve decode --prefill-addrs`` as subprocesses on the one GPU
   (Mooncake over TCP loopback between their GPU pools); each pod's share of the GPU is its weights plus
   ``--cache-memory-mb`` for KV pages and GDN states (both set here, so the two never size themselves from the
   same free memory). Warm-up prompts of each length first, then the same prompts as the reference, one at a time
   over the public gRPC API (streaming, timestamped at the client). Their greedy tokens must equal the
   reference's (checked for every prompt; the run exits 1 after writing its JSON if one differs).
3. The TTFT split per prompt: the client's TTFT = the decode pod's Prefill call (the prefill pod's compute from
   the call's arrival to its first token + its Mooncake write of the KV pages and states + gRPC) + the decode
   pod's own part (admission, then handing the first token back); the first decode step = first to second token
   at the client. Call, compute and transfer times come from the decode pod's ``remote prefill`` log line (the
   prefill pod reports its two in ``PrefillResponse``). The ratio to the single-process TTFT is the cost of
   disaggregation on one GPU.
4. With ``--floor-concurrency``: ``python -m loadtest generate agentic`` (first turn ``--floor-first-turn``
   tokens, follow-ups of ``--floor-turn-tokens`` new tokens) and ``python -m loadtest run`` against the decode pod,
   closed loop at each concurrency for ``--floor-duration-s``; the floor metric is the largest concurrency whose
   p10 per-request decode speed is >= 70 tok/s, with its output tokens per minute and TTFT p50/p99 of first and
   follow-up turns.

Writes JSON and a PNG (TTFT parts per length, PD against single-process).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_pd_gpu")

# The decode pod's line per answered Prefill call (services/decode/server.py).
_HANDOVER_RE = re.compile(
    r"remote prefill (?P<call_id>\S+): (?P<tokens>\d+) tokens \((?P<cached>\d+) cached here\) from \S+: "
    r"call (?P<call>[\d.]+) s = compute (?P<compute>[\d.]+) s \+ transfer (?P<transfer>[\d.]+) s "
    r"\((?P<bytes>\d+) bytes, (?P<pages>\d+) pages\)"
)


def parse_handover(line: str) -> dict | None:
    """The numbers of one ``remote prefill`` log line of the decode pod, or None for any other line."""
    m = _HANDOVER_RE.search(line)
    if m is None:
        return None
    return {"call_id": m["call_id"], "tokens": int(m["tokens"]), "cached_tokens": int(m["cached"]),
            "call_s": float(m["call"]), "compute_s": float(m["compute"]), "transfer_s": float(m["transfer"]),
            "bytes": int(m["bytes"]), "pages": int(m["pages"])}


def ttft_split(client_ttft_s: float, handover: dict) -> dict:
    """The client's TTFT in parts that add up to it: the prefill pod's compute and write, the gRPC and
    scheduling around that call, and the decode pod's own part (everything of the TTFT outside the call)."""
    call, compute, transfer = handover["call_s"], handover["compute_s"], handover["transfer_s"]
    return {"ttft_s": client_ttft_s, "prefill_compute_s": compute, "transfer_s": transfer,
            "prefill_call_rest_s": max(0.0, call - compute - transfer),
            "decode_pod_s": max(0.0, client_ttft_s - call)}


def make_prompts(lengths: list[int], reps: int, vocab: int, seed: int) -> list[dict]:
    """Warm-up prompts (one per length) and the measured ones (``reps`` per length), fresh random tokens each:
    no two share a page, so neither the decode pod's nor the prefill pod's prefix cache serves any of them."""
    import random

    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for rep in range(-1, reps):
            prompts.append({"length": length, "rep": rep, "warmup": rep < 0,
                            "tokens": [rng.randrange(vocab) for _ in range(length)]})
    return prompts


def floor_point(levels: list[dict], floor_tok_s: float = 70.0) -> dict | None:
    """The highest-concurrency level whose p10 per-request decode speed holds the floor (None if none does),
    with what it delivers: output tokens per minute and TTFT p50/p99 of first turns and of follow-ups."""
    good = [lv for lv in levels if (lv.get("decode_p10_tok_s") or 0) >= floor_tok_s and not lv.get("errors")]
    return max(good, key=lambda lv: lv["concurrency"]) if good else None


def turn_ttfts(requests: list[dict]) -> dict:
    """TTFT p50/p99 (s) of first turns (turn 0) and follow-up turns, from a load-test level's request records."""
    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    out = {}
    for name, keep in (("first_turn", lambda t: t == 0), ("follow_up", lambda t: t > 0)):
        ttfts = [r["chunks"][0][0] for r in requests if keep(r["turn"]) and r.get("error") is None and r["chunks"]]
        out[name] = {"n": len(ttfts), "p50_s": pct(ttfts, 50), "p99_s": pct(ttfts, 99)}
    return out


# ---- engine settings shared by the reference and the pods ------------------------------------------------
def engine_flags(args) -> dict:
    return {"model": args.model, "load_format": "dummy", "device": args.device, "dtype": args.dtype,
            "page_size": args.page_size, "cuda_graph_max_batch": args.cuda_graph_max_batch,
            "max_model_len": args.max_model_len}


def pod_flags(args, cache_mb: int, max_num_seqs: int, checkpoint_slots: int = 0) -> list[str]:
    flags = ["--num-checkpoint-slots", str(checkpoint_slots)] if checkpoint_slots else []
    for key, value in engine_flags(args).items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags + ["--cache-memory-mb", str(cache_mb), "--max-num-seqs", str(max_num_seqs),
                    "--remote-prefill-threshold", str(args.threshold)]


# ---- 1. the single-process reference ------------------------------------------------------------------------
def _generate(engine, tokens: list[int], params, hold: bool) -> tuple[list[int], list[float], list[float]]:
    """One prompt through ``engine`` alone: its tokens, their log-probabilities and their times since it was
    added. ``hold``: as a prefill pod runs it (``hold_memory``: the hand-over's checkpoint plan, with the state
    at the prompt's resume boundary), the memory released at the end."""
    start = time.perf_counter()
    request_id = engine.add_request(list(tokens), params, hold_memory=hold)
    stamps, out, logprobs = [], [], []
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token_ids:
                now = time.perf_counter() - start
                stamps.extend([now] * len(o.new_token_ids))
                out.extend(o.new_token_ids)
                logprobs.extend(o.new_logprobs or [])
    if hold:
        engine.release_held(request_id)
    return out, logprobs, stamps


def _reference(args, prompts: list[dict], conn) -> None:
    import torch

    from services.engine.config import EngineConfig
    from services.engine.engine import Engine
    from services.engine.request import SamplingParams

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The prefill pod's checkpoint settings, so that a prompt is split at the same places in both (see
    # same_plan below).
    engine = Engine(EngineConfig(**engine_flags(args), cache_memory_mb=args.prefill_cache_mb,
                                 max_num_seqs=args.prefill_max_seqs, num_checkpoint_slots=args.checkpoint_slots))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, logprobs=True)
    rows = []
    for p in prompts:
        tokens, logprobs, stamps = _generate(engine, p["tokens"], params, hold=False)
        engine.flush_cache()
        # The same engine with the hand-over's checkpoint plan (the request held as a prefill pod holds it):
        # a prefill pod also checkpoints the state at the prompt's resume boundary, (n - 1) // page * page, which
        # for a page-aligned prompt is a split point the plain engine does not have; the GDN kernels then chunk
        # the last tokens differently (rounding-level differences that flip near-tied argmaxes of random weights).
        same_tokens, same_logprobs, _ = _generate(engine, p["tokens"], params, hold=True)
        engine.flush_cache()
        rows.append({"length": p["length"], "rep": p["rep"], "tokens": tokens, "logprobs": logprobs,
                     "same_plan_tokens": same_tokens, "same_plan_logprobs": same_logprobs, "ttft_s": stamps[0],
                     "plain_equals_same_plan": tokens == same_tokens,
                     "first_decode_step_s": stamps[1] - stamps[0] if len(stamps) > 1 else None,
                     "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None})
        log.info("reference %d tokens (rep %d): TTFT %.3f s; plain == same plan: %s", p["length"], p["rep"],
                 stamps[0], tokens == same_tokens)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    conn.send({"gpu": gpu, "runs": rows, "backend": engine.runner.ops.name})


def compare(tokens: list[int], logprobs: list[float], ref_tokens: list[int], ref_logprobs: list[float]) -> dict:
    """Greedy agreement with a reference: equal, the first differing position, and the largest log-probability
    difference of the chosen tokens before it (how close the two computations are where they agree; None when
    they differ at the first token)."""
    mismatch = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b), None)
    if mismatch is None and len(tokens) != len(ref_tokens):
        mismatch = min(len(tokens), len(ref_tokens))
    upto = len(tokens) if mismatch is None else mismatch
    diffs = [abs(a - b) for a, b in zip(logprobs[:upto], ref_logprobs[:upto], strict=False)]
    return {"equal": mismatch is None, "first_mismatch": mismatch,
            "max_logprob_diff": max(diffs) if diffs else None}


def run_reference(args, prompts: list[dict]) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_reference, args=(args, prompts, child))
    proc.start()
    result = parent.recv()
    proc.join(timeout=120)
    return result


# ---- 2-3. the pair ---------------------------------------------------------------------------------------------
def _stream(decode, tokens: list[int], max_tokens: int, request_id: str):
    from services.common.protos import inference_pb2

    request = inference_pb2.GenerateRequest(
        request_id=request_id, token_ids=inference_pb2.TokenIds(ids=tokens),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                              logprobs=True),
    )
    out, logprobs, stamps = [], [], []
    start = time.perf_counter()
    for response in decode.inference.Generate(request, timeout=600):
        now = time.perf_counter() - start
        out.extend(response.token_ids)
        logprobs.extend(response.logprobs)
        stamps.extend([now] * len(response.token_ids))
    return out, logprobs, stamps


def run_pair(args, prompts: list[dict], reference: dict) -> dict:
    import tests.pods
    from tests.pods import Pod

    # A pod of 35B-A3B dims initialises ~35 GB of weights and captures its decode graphs before it is ready.
    tests.pods.READY_TIMEOUT_S = max(tests.pods.READY_TIMEOUT_S, 600)

    started = time.monotonic()
    prefill = Pod("prefill", *pod_flags(args, args.prefill_cache_mb, args.prefill_max_seqs, args.checkpoint_slots))
    # A decode pod's step budget bounds how long a follow-up's local prefill stalls every running decode.
    step_flags = (["--max-num-batched-tokens", str(args.decode_step_tokens), "--prefill-chunk-size",
                   str(args.decode_step_tokens)] if args.decode_step_tokens else [])
    decode = Pod("decode", *pod_flags(args, args.decode_cache_mb, args.decode_max_seqs), *step_flags,
                 "--prefill-addrs", prefill.address, "--prefill-timeout-s", "300")
    log.info("pods ready in %.1f s (prefill %s, decode %s)", time.monotonic() - started, prefill.address,
             decode.address)
    ref = {(r["length"], r["rep"]): r for r in reference["runs"]} if reference else None
    rows = []
    try:
        for i, p in enumerate(prompts):
            request_id = f"bench{i}"
            since = decode.mark()
            tokens, logprobs, stamps = _stream(decode, p["tokens"], args.max_tokens, request_id)
            line = decode.wait_for_log(f"remote prefill {request_id}.", timeout=30, since=since)
            handover = parse_handover(line)
            if ref is None:  # --floor-only: a warm-up of the pods, nothing to compare with
                log.info("warm-up %d tokens: TTFT %.3f s, split %s", p["length"], stamps[0], handover)
                continue
            r = ref[(p["length"], p["rep"])]
            same = compare(tokens, logprobs, r["same_plan_tokens"], r["same_plan_logprobs"])
            plain = compare(tokens, logprobs, r["tokens"], r["logprobs"])
            row = {"length": p["length"], "rep": p["rep"], "warmup": p["warmup"],
                   "equal_to_reference": same["equal"], "vs_same_plan": same, "vs_plain": plain,
                   "reference_plain_equals_same_plan": r["plain_equals_same_plan"],
                   **ttft_split(stamps[0], handover), "handover": handover,
                   "first_decode_step_s": stamps[1] - stamps[0] if len(stamps) > 1 else None,
                   "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
                   "reference_ttft_s": r["ttft_s"], "reference_first_decode_step_s": r["first_decode_step_s"]}
            row["ttft_ratio_to_reference"] = row["ttft_s"] / r["ttft_s"]
            row["transfer_GBps"] = handover["bytes"] / handover["transfer_s"] / 1e9 if handover["transfer_s"] else None
            rows.append(row)
            log.info("PD %d tokens (rep %d%s): equal %s (plain engine: %s), TTFT %.3f s (single process %.3f) = "
                     "compute %.3f + "
                     "transfer %.3f (%.0f MB, %.2f GB/s) + call rest %.3f + decode pod %.3f; first decode step %.1f ms",
                     p["length"], p["rep"], ", warm-up" if p["warmup"] else "", row["equal_to_reference"], plain,
                     row["ttft_s"], r["ttft_s"], row["prefill_compute_s"], row["transfer_s"], handover["bytes"] / 1e6,
                     row["transfer_GBps"] or 0, row["prefill_call_rest_s"], row["decode_pod_s"],
                     1e3 * (row["first_decode_step_s"] or 0))
        result = {"runs": rows}
        if args.floor_concurrency:
            result["floor"] = run_floor(args, prefill, decode)
        result["prefill_log_tail"] = prefill.log[-20:]
        result["decode_log_tail"] = decode.log[-20:]
        return result
    finally:
        decode.stop()
        prefill.stop()


# ---- 4. the floor metric ---------------------------------------------------------------------------------------
def run_floor(args, prefill, decode) -> dict:
    out_dir = Path(args.out).parent
    stem = Path(args.out).stem
    workload = out_dir / f"{stem}_agentic.jsonl"
    levels = [int(c) for c in args.floor_concurrency.split(",")]
    subprocess.run([sys.executable, "-m", "loadtest", "generate", "agentic", "--out", str(workload),
                    "--conversations", str(max(levels) * 2), "--first-turn-tokens", str(args.floor_first_turn),
                    "--turn-tokens", str(args.floor_turn_tokens), "--follow-ups", args.floor_follow_ups,
                    "--output-tokens", str(args.floor_output_tokens), "--think-time-s", str(args.floor_think_s),
                    "--vocab-size", str(args.vocab_size), "--seed", "1"], check=True)
    metrics = [f"http://127.0.0.1:{pod.info['metrics_port']}/metrics" for pod in (decode, prefill)]
    # One `loadtest run` per level, each with its own time limit and fresh tokens (--salt): a level that hangs
    # costs only itself, and the levels done so far are kept.
    results = None
    for c in levels:
        raw = out_dir / f"{stem}_loadtest_c{c}.json"
        cmd = [sys.executable, "-m", "loadtest", "run", "--workload", str(workload), "--api", "grpc",
               "--target", decode.address, "--concurrency", str(c), "--salt", str(1000 + c),
               "--max-duration-s", str(args.floor_duration_s), "--ramp-s", str(args.floor_ramp_s),
               "--request-timeout-s", "120", "--no-progress",
               "--out", str(raw)]
        for url in metrics:
            cmd += ["--metrics-url", url]
        try:
            subprocess.run(cmd, check=True, timeout=args.floor_duration_s + 60)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as err:
            log.error("floor level c=%d did not complete: %s", c, err)
            break
        level = json.loads(raw.read_text())
        if results is None:
            results = level
        else:
            results["levels"] += level["levels"]
        s = level["levels"][0]["summary"]
        log.info("floor level c=%d: p10 %s tok/s, %s output tok/s, %d ok, errors %s", c,
                 (s["decode_tok_s_per_user"] or {}).get("p10"), s["throughput"]["output_tok_s"], s["ok"], s["errors"])
    if results is None:
        return {"levels": [], "floor_tok_s": 70.0, "at_floor": None}
    raw = out_dir / f"{stem}_loadtest.json"
    raw.write_text(json.dumps(results, indent=1))
    summary = []
    for level in results["levels"]:
        s = level["summary"]
        speed = s["decode_tok_s_per_user"] or {}
        summary.append({
            "concurrency": level["concurrency"], "requests_ok": s["ok"], "errors": s["errors"],
            "decode_p10_tok_s": speed.get("p10"), "decode_p50_tok_s": speed.get("p50"),
            "share_at_floor": s["share_at_decode_floor"], "output_tok_s": s["throughput"]["output_tok_s"],
            "output_tok_per_min": (s["throughput"]["output_tok_s"] or 0) * 60,
            "prompt_tok_s": s["throughput"]["prompt_tok_s"], "cache_hit_rate": s["cache"]["hit_rate"],
            "ttft": turn_ttfts(level["requests"]), "duration_s": s["duration_s"],
        })
        log.info("floor sweep c=%d: p10 %.1f tok/s, p50 %.1f, %.0f output tok/s, %d ok, errors %s",
                 level["concurrency"], speed.get("p10") or 0, speed.get("p50") or 0,
                 s["throughput"]["output_tok_s"] or 0, s["ok"], s["errors"])
    return {"workload": results["workload"], "levels": summary, "floor_tok_s": 70.0,
            "at_floor": floor_point(summary), "loadtest_json": raw.name}


def _floor_panel(ax, floor: dict) -> None:
    levels = floor["levels"]
    cs = [lv["concurrency"] for lv in levels]
    ax.plot(cs, [lv["decode_p10_tok_s"] or 0 for lv in levels], "o-", label="decode tok/s per request, p10")
    ax.plot(cs, [lv["decode_p50_tok_s"] or 0 for lv in levels], "x--", label="p50")
    ax.axhline(floor["floor_tok_s"], color="red", lw=0.8, label=f"{floor['floor_tok_s']:.0f} tok/s floor")
    ax.set(xlabel="concurrent agentic users (closed loop)", ylabel="tok/s per request",
           title="floor sweep (prefill + decode pod on one GPU)")
    twin = ax.twinx()
    twin.plot(cs, [lv["output_tok_s"] or 0 for lv in levels], "s:", color="green", label="output tok/s (GPU)")
    twin.set_ylabel("output tok/s, whole GPU")
    ax.legend(fontsize=8, loc="lower left")
    twin.legend(fontsize=8, loc="upper right")


def _figure(results: dict, panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    fig.suptitle(f"{results['model']} on {results['gpu']}: prefill + decode pod on one GPU, Mooncake TCP", fontsize=10)
    return fig, axes[0]


def plot_floor(results: dict, path: Path) -> None:
    fig, (ax,) = _figure(results, 1)
    _floor_panel(ax, results["pair"]["floor"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(results: dict, path: Path) -> None:
    runs = [r for r in results["pair"]["runs"] if not r["warmup"]]
    lengths = sorted({r["length"] for r in runs})
    parts = (("prefill_compute_s", "prefill pod compute"), ("transfer_s", "Mooncake write (KV + states)"),
             ("prefill_call_rest_s", "gRPC + scheduling of the call"),
             ("decode_pod_s", "decode pod (admit, hand back)"))
    floor = results["pair"].get("floor")
    fig, axes = _figure(results, 2 if floor else 1)
    ax = axes[0]
    x = range(len(lengths))
    bottom = [0.0] * len(lengths)
    for key, label in parts:
        values = [statistics.median(r[key] for r in runs if r["length"] == n) for n in lengths]
        ax.bar([i - 0.2 for i in x], values, 0.4, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ref = [statistics.median(r["reference_ttft_s"] for r in runs if r["length"] == n) for n in lengths]
    ax.bar([i + 0.2 for i in x], ref, 0.4, label="single-process engine TTFT", color="grey")
    ax.set_xticks(list(x), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set(xlabel="prompt tokens", ylabel="seconds (median)", title="time to first token: PD pair vs one engine")
    ax.legend(fontsize=8)
    if floor:
        _floor_panel(axes[1], floor)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_floor(floor: dict) -> None:
    def ms(v):
        return f"{1e3 * v:.0f}" if v is not None else "-"

    for lv in floor["levels"]:
        t = lv["ttft"]
        print(f"c={lv['concurrency']:>3}: p10 {lv['decode_p10_tok_s'] or 0:6.1f} tok/s (p50 "
              f"{lv['decode_p50_tok_s'] or 0:5.1f}), {lv['output_tok_per_min']:8.0f} tok/min, TTFT ms first turn "
              f"p50/p99 {ms(t['first_turn']['p50_s'])}/{ms(t['first_turn']['p99_s'])} (n={t['first_turn']['n']}), "
              f"follow-up {ms(t['follow_up']['p50_s'])}/{ms(t['follow_up']['p99_s'])} (n={t['follow_up']['n']}), "
              f"hit {lv['cache_hit_rate'] or 0:.2f}, errors {lv['errors']}")
    at = floor["at_floor"]
    print(f"floor metric: {at['concurrency'] if at else 0} users at p10 >= 70 tok/s"
          + (f", {at['output_tok_per_min']:.0f} output tokens/min on the GPU" if at else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b:20")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--threshold", type=int, default=512, help="the decode pod's remote-prefill threshold")
    parser.add_argument("--max-model-len", type=int, default=40960)
    parser.add_argument("--cuda-graph-max-batch", type=int, default=64)
    parser.add_argument("--prefill-cache-mb", type=int, default=12288, help="also the reference engine's")
    parser.add_argument("--checkpoint-slots", type=int, default=300,
                        help="the prefill pod's and the reference's: every checkpoint of the longest prompt")
    parser.add_argument("--decode-cache-mb", type=int, default=16384)
    parser.add_argument("--prefill-max-seqs", type=int, default=8)
    parser.add_argument("--decode-max-seqs", type=int, default=64)
    parser.add_argument("--decode-step-tokens", type=int, default=0,
                        help="the decode pod's token budget per step and prefill chunk (0: the engine's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-concurrency", default="", help="closed-loop sweep of agentic users (empty: none)")
    parser.add_argument("--floor-first-turn", type=int, default=8192)
    parser.add_argument("--floor-turn-tokens", type=int, default=800)
    parser.add_argument("--floor-follow-ups", default="10:15")
    parser.add_argument("--floor-output-tokens", type=int, default=256)
    parser.add_argument("--floor-think-s", type=float, default=5.0)
    parser.add_argument("--floor-duration-s", type=float, default=60.0)
    parser.add_argument("--floor-ramp-s", type=float, default=0.0,
                        help="users start spread over this many seconds; each level's summary counts the requests "
                        "started after it")
    parser.add_argument("--floor-only", action="store_true",
                        help="no reference and no TTFT prompts: the pods, one warm-up prompt, the floor sweep")
    parser.add_argument("--out", default="pd_gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from services.engine.presets import model_config_for

    args.vocab_size = model_config_for(args.model, dummy=True).vocab_size
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.floor_only:
        warmup = make_prompts([args.floor_first_turn], 0, args.vocab_size, args.seed)
        import torch

        gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        results = {"benchmark": "PD pair on one GPU: agentic floor metric", "model": args.model, "gpu": gpu,
                   "settings": {k: v for k, v in vars(args).items() if k != "out"},
                   "pair": run_pair(args, warmup, None)}
        out.write_text(json.dumps(results, indent=2))
        plot_floor(results, out.with_suffix(".png"))
        print_floor(results["pair"]["floor"])
        return 0
    lengths = [int(n) for n in args.lengths.split(",")]
    prompts = make_prompts(lengths, args.reps, args.vocab_size, args.seed)
    started = time.monotonic()
    reference = run_reference(args, prompts)
    log.info("reference done in %.1f s", time.monotonic() - started)
    results = {"benchmark": "PD pair on one GPU", "model": args.model, "gpu": reference["gpu"],
               "backend": reference["backend"], "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "reference": [{k: v for k, v in r.items() if "tokens" not in k and "logprobs" not in k}
                             for r in reference["runs"]]}
    results["pair"] = run_pair(args, prompts, reference)
    runs = results["pair"]["runs"]
    results["all_equal_to_reference"] = all(r["equal_to_reference"] for r in runs)
    results["all_equal_to_plain_engine"] = all(r["vs_plain"]["equal"] for r in runs)
    results["reference_plain_equals_same_plan"] = all(r["plain_equals_same_plan"] for r in reference["runs"])
    results["summary"] = []
    for n in lengths:
        timed = [r for r in runs if r["length"] == n and not r["warmup"]]
        med = {key: statistics.median(r[key] for r in timed) for key in
               ("ttft_s", "prefill_compute_s", "transfer_s", "prefill_call_rest_s", "decode_pod_s",
                "first_decode_step_s", "reference_ttft_s", "reference_first_decode_step_s", "decode_tok_s")}
        med["transfer_GBps"] = statistics.median(r["transfer_GBps"] for r in timed)
        med["ttft_ratio_to_reference"] = med["ttft_s"] / med["reference_ttft_s"]
        med["handover_bytes"] = timed[0]["handover"]["bytes"]
        results["summary"].append({"length": n, "reps": len(timed), **med})
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"{'tokens':>7} {'TTFT s':>7} {'1-proc':>7} {'ratio':>6} {'compute':>8} {'transfer':>8} {'GB/s':>6} "
          f"{'rest':>6} {'decode':>7} {'1st step ms':>11} {'tok/s':>6}")
    for s in results["summary"]:
        print(f"{s['length']:>7} {s['ttft_s']:>7.3f} {s['reference_ttft_s']:>7.3f} "
              f"{s['ttft_ratio_to_reference']:>6.2f} "
              f"{s['prefill_compute_s']:>8.3f} {s['transfer_s']:>8.3f} {s['transfer_GBps']:>6.2f} "
              f"{s['prefill_call_rest_s']:>6.3f} {s['decode_pod_s']:>7.3f} {1e3 * s['first_decode_step_s']:>11.2f} "
              f"{s['decode_tok_s']:>6.1f}")
    print(f"greedy tokens equal to the single-process engine's (same checkpoint plan) for all {len(runs)} prompts: "
          f"{results['all_equal_to_reference']}; to the plain engine's: {results['all_equal_to_plain_engine']} "
          f"(the plain engine equals itself with the hand-over's plan: {results['reference_plain_equals_same_plan']}); "
          f"largest log-prob difference to the plain engine before the first differing token: "
          f"{max(r['vs_plain']['max_logprob_diff'] or 0 for r in runs):.4f}")
    if results["pair"].get("floor"):
        print_floor(results["pair"]["floor"])
    return 0 if results["all_equal_to_reference"] else 1


if __name__ == "__main__":
    sys.exit(main())
