"""What a decode pod reuses after a remote prefill, measured from the public API with real pods.

    python -m loadtest.pd_cache_reuse --lengths 64,300,1000 --out pd_cache_reuse.json

One prefill pod and one decode pod (processes on loopback, Mooncake over TCP, a random-weight model of the
given preset, page 16, every uncached prompt of at least ``--threshold`` tokens prefilled remotely). Per
prompt length: the prompt once (a remote prefill), the same prompt again (regenerate, retries, best-of-n),
and a branch that keeps its first half and continues differently (sub-agents sharing a context). For each,
the cached tokens the decode pod reports, the bytes and KV pages the prefill pod sent, and whether the
tokens equal the first send's. Run once with the resume-boundary checkpoint in the hand-over (now) and once
without (``--handover-resume-checkpoint false``, the hand-over as it was). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tests.pods import Pod

PAGE = 16


def _counter(pod: Pod, name: str) -> float:
    return pod.metrics().get(name, 0.0)


def _send(decode: Pod, prefill: Pod, tokens: list[int], max_tokens: int) -> dict:
    sent, pages = _counter(prefill, "baton_transfer_bytes_total"), _counter(prefill, "baton_transfer_kv_pages_total")
    out, last = decode.generate(tokens, max_tokens=max_tokens)
    return {
        "tokens": out, "cached_tokens": last.usage.cached_tokens,
        "bytes_sent": _counter(prefill, "baton_transfer_bytes_total") - sent,
        "kv_pages_sent": _counter(prefill, "baton_transfer_kv_pages_total") - pages,
    }


def measure(model: str, lengths: list[int], threshold: int, checkpoint: bool, seed: int) -> list[dict]:
    flags = ["--model", model, "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
             "--page-size", str(PAGE), "--num-pages", "2048", "--max-num-seqs", "8",
             "--remote-prefill-threshold", str(threshold),
             "--handover-resume-checkpoint", "true" if checkpoint else "false"]
    prefill = Pod("prefill", *flags)
    decode = Pod("decode", *flags, "--prefill-addrs", prefill.address)
    rng = random.Random(seed)
    rows = []
    try:
        for n in lengths:
            vocab = 200
            prompt = [rng.randrange(vocab) for _ in range(n)]
            first = _send(decode, prefill, prompt, 8)
            again = _send(decode, prefill, prompt, 8)
            branch_prompt = prompt[: n // 2] + [rng.randrange(vocab) for _ in range(n - n // 2)]
            branch = _send(decode, prefill, branch_prompt, 8)
            rows.append({
                "prompt_tokens": n, "first": first, "again": again, "branch": branch,
                "again_equal": again["tokens"] == first["tokens"],
            })
            print(f"{'with' if checkpoint else 'without'} checkpoint, {n} tokens: first sent "
                  f"{first['bytes_sent'] / 1e6:.2f} MB; again cached {again['cached_tokens']}, sent "
                  f"{again['bytes_sent'] / 1e6:.2f} MB ({again['kv_pages_sent']:.0f} pages); branch cached "
                  f"{branch['cached_tokens']}, sent {branch['bytes_sent'] / 1e6:.2f} MB", flush=True)
    finally:
        decode.stop()
        prefill.stop()
    for row in rows:
        for key in ("first", "again", "branch"):
            row[key].pop("tokens")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen3.5-moe")
    parser.add_argument("--lengths", default="64,300,1000")
    parser.add_argument("--threshold", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="pd_cache_reuse.json")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    results = {
        "benchmark": "decode pod cache after a remote prefill", "model": args.model, "page_size": PAGE,
        "remote_prefill_threshold": args.threshold,
        "with_checkpoint": measure(args.model, lengths, args.threshold, True, args.seed),
        "without_checkpoint": measure(args.model, lengths, args.threshold, False, args.seed),
    }
    for a, b in zip(results["with_checkpoint"], results["without_checkpoint"], strict=True):
        a["bytes_added_per_handover"] = a["first"]["bytes_sent"] - b["first"]["bytes_sent"]
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
