"""Accuracy of the FP8 KV cache against the model-dtype KV cache: greedy agreement and log-prob differences.

    python -m loadtest.bench_kv_fp8 --model qwen3.5-35b-a3b:4 --prompt-lens 2048,32768 --out kv_fp8.json

Two engines of the same weights (dummy weights for a preset, seeded alike), one with ``--kv-cache-dtype``
(default fp8_e4m3), one with ``--baseline-kv-cache-dtype`` (default auto: the model dtype). For each random prompt:

- free-running greedy (``--max-tokens``, batched as served): where the two continuations first differ, and the
  largest |difference| of the chosen tokens' log-probs before that;
- teacher-forced: both engines read the same tokens (the prompt + the baseline's continuation) and give
  log-probs at the scored positions (the prompt's last ``--scored-prompt-tokens`` and every continuation
  position): argmax agreement, |difference| of the log-prob of the baseline's argmax (mean, max), mean KL
  divergence (baseline || candidate), relative error of the logits.

Random-weight models at real shapes have near-tied logits (a 248K vocabulary, no training), so token agreement
there is a weak yardstick: compare against the noise floor of the same run with another model dtype, e.g.
``--dtype bfloat16 --kv-cache-dtype auto --baseline-dtype float32`` (bf16 against fp32, both model-dtype KV).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.request import Request, SamplingParams
from services.engine.scheduler import ScheduledSeq

log = logging.getLogger("bench_kv_fp8")


def teacher_forced_logprobs(engine: Engine, tokens: list[int], scored_from: int) -> torch.Tensor:
    """fp64 log-probs ``[len(tokens) - scored_from, vocab]`` of the positions from ``scored_from`` on, the
    sequence run through the engine's model in prefill chunks (scheduler bypassed; memory freed after)."""
    runner, page = engine.runner, engine.config.page_size
    request = Request("teacher-forced", list(tokens), SamplingParams())
    request.state_slot = engine.slots.allocate_one()
    request.page_ids = engine.pages.allocate(-(-len(tokens) // page))
    chunk = engine.config.prefill_chunk_size
    pieces = []
    try:
        for start in range(0, len(tokens), chunk):
            end = min(start + chunk, len(tokens))
            batch = runner.build_batch([ScheduledSeq(request, end - start, start=start)])
            first = max(scored_from, start) - start
            if first >= end - start:
                batch.logits_indices = torch.tensor([end - start - 1], device=runner.device)  # unused
                runner.model(batch, runner.kv_cache, runner.state_cache)
                continue
            batch.logits_indices = torch.arange(first, end - start, device=runner.device)
            logits = runner.model(batch, runner.kv_cache, runner.state_cache)
            pieces.append(torch.log_softmax(logits.double(), dim=-1))
    finally:
        engine.pages.free(request.page_ids)
        engine.slots.free([request.state_slot])
    return torch.cat(pieces)


def compare_kv_dtypes(baseline: Engine, candidate: Engine, prompts: list[list[int]], max_tokens: int,
                      scored_prompt_tokens: int | None = None) -> dict:
    """The measurements described in the module docstring, per sequence and overall. ``scored_prompt_tokens``:
    how many of each prompt's last positions to score teacher-forced (None: all)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=True, ignore_eos=True)
    expected, got = baseline.generate(prompts, params), candidate.generate(prompts, params)
    for engine in (baseline, candidate):
        engine.flush_cache()  # the teacher-forced passes below take their own pages
    sequences = []
    agree = total = 0
    diffs, kls, errs = [], [], []
    for prompt, want, have in zip(prompts, expected, got, strict=True):
        pairs = enumerate(zip(want.token_ids, have.token_ids, strict=True))
        n = next((i for i, (a, b) in pairs if a != b), len(want.token_ids))
        before = [abs(a - b) for a, b in zip(want.logprobs[:n], have.logprobs[:n], strict=True)]
        tokens = prompt + want.token_ids
        scored_from = 0 if scored_prompt_tokens is None else max(0, len(prompt) - scored_prompt_tokens)
        ref = teacher_forced_logprobs(baseline, tokens, scored_from)
        cand = teacher_forced_logprobs(candidate, tokens, scored_from)
        top = ref.argmax(-1, keepdim=True)
        seq_agree = int((cand.argmax(-1, keepdim=True) == top).sum())
        diff = (cand.gather(1, top) - ref.gather(1, top)).abs().flatten()
        kl = (ref.exp() * (ref - cand)).sum(-1)
        err = float((cand.exp() - ref.exp()).norm() / ref.exp().norm())
        agree, total = agree + seq_agree, total + len(top)
        diffs.append(diff.cpu())
        kls.append(kl.cpu())
        errs.append(err)
        sequences.append({
            "prompt_len": len(prompt), "first_divergence": n, "max_tokens": max_tokens,
            "max_abs_logprob_diff_before_divergence": max(before, default=0.0),
            "teacher_forced_positions": len(top), "teacher_forced_argmax_agreement": seq_agree / len(top),
            "teacher_forced_mean_abs_logprob_diff": float(diff.mean()),
            "teacher_forced_max_abs_logprob_diff": float(diff.max()),
            "teacher_forced_mean_kl": float(kl.mean()),
            "teacher_forced_probs_rel_err": err,
        })
    diffs_all, kls_all = torch.cat(diffs), torch.cat(kls)
    return {
        "sequences": sequences,
        "greedy": {
            "first_divergence": [s["first_divergence"] for s in sequences],
            "tokens_equal_before_divergence": sum(s["first_divergence"] for s in sequences) / (
                max_tokens * len(sequences)),
            "max_abs_logprob_diff_before_divergence": max(s["max_abs_logprob_diff_before_divergence"]
                                                          for s in sequences),
        },
        "teacher_forced": {
            "positions": total, "argmax_agreement": agree / total,
            "mean_abs_logprob_diff": float(diffs_all.mean()), "max_abs_logprob_diff": float(diffs_all.max()),
            "mean_kl": float(kls_all.mean()), "max_kl": float(kls_all.max()),
            "max_probs_rel_err": max(errs),
        },
    }


def _engine(args: argparse.Namespace, dtype: str, kv_cache_dtype: str, num_pages: int) -> Engine:
    is_preset = not Path(args.model).is_dir()
    return Engine(EngineConfig(
        model=args.model, load_format="dummy" if is_preset else "auto", tokenizer="byte", device=args.device,
        dtype=dtype, kv_cache_dtype=kv_cache_dtype, kernels=args.kernels, seed=args.seed, page_size=args.page_size,
        max_num_seqs=max(4, args.prompts), num_pages=num_pages, prefill_chunk_size=args.prefill_chunk_size,
        max_num_batched_tokens=max(args.prefill_chunk_size, args.prompts),
        cuda_graph_max_batch=args.cuda_graphs if args.device != "cpu" else 0, checkpoint_interval=args.page_size * 8,
    ))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b:4", help="preset (dummy weights) or HF directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="the candidate engine's model dtype")
    parser.add_argument("--kv-cache-dtype", default="fp8_e4m3", help="the candidate engine's KV cache")
    parser.add_argument("--baseline-dtype", default="", help="the baseline's model dtype (default: --dtype)")
    parser.add_argument("--baseline-kv-cache-dtype", default="auto")
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--cuda-graphs", type=int, default=16, help="CUDA graphs up to this batch size (0: off)")
    parser.add_argument("--prompt-lens", default="", help="comma-separated prompt lengths (overrides --prompt-len)")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per length")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--scored-prompt-tokens", type=int, default=128,
                        help="teacher-forced: score this many of each prompt's last positions (-1: all)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--prefill-chunk-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="kv_fp8.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    lengths = [int(n) for n in args.prompt_lens.split(",")] if args.prompt_lens else [args.prompt_len]
    # Pages for one length's batch plus one teacher-forced sequence, at the longest length.
    longest = max(lengths) + args.max_tokens
    num_pages = (args.prompts + 1) * -(-longest // args.page_size) + 64
    started = time.monotonic()
    baseline = _engine(args, args.baseline_dtype or args.dtype, args.baseline_kv_cache_dtype, num_pages)
    candidate = _engine(args, args.dtype, args.kv_cache_dtype, num_pages)
    if not Path(args.model).is_dir():
        # Dummy weights: the same values in both (a seeded draw need not give the same numbers in two dtypes).
        weights = dict(baseline.runner.model.named_parameters())
        for name, param in candidate.runner.model.named_parameters():
            param.data.copy_(weights[name].data)
    load_s = time.monotonic() - started
    vocab = candidate.model_config.vocab_size
    results = {
        "benchmark": "KV cache accuracy", "model": args.model, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else None,
        "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
        "baseline_dtype": args.baseline_dtype or args.dtype, "baseline_kv_cache_dtype": args.baseline_kv_cache_dtype,
        "kernels": candidate.runner.ops.name,
        "kv_scales": {"k": candidate.runner.kv_cache.k_scales, "v": candidate.runner.kv_cache.v_scales},
        "command": "python -m loadtest.bench_kv_fp8 " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "load_s": load_s, "by_length": [], "sequences": [],
    }
    started = time.monotonic()
    for i, length in enumerate(lengths):
        gen = torch.Generator().manual_seed(args.seed * 1000 + i)
        prompts = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(args.prompts)]
        scored = None if args.scored_prompt_tokens < 0 else args.scored_prompt_tokens
        report = compare_kv_dtypes(baseline, candidate, prompts, args.max_tokens, scored)
        results["by_length"].append({"prompt_len": length, "greedy": report["greedy"],
                                     "teacher_forced": report["teacher_forced"]})
        results["sequences"] += report["sequences"]
        log.info("prompt %d: greedy first divergence %s; teacher-forced argmax agreement %.4f, |dlogprob| mean %.4f "
                 "max %.4f, mean KL %.2e", length, report["greedy"]["first_divergence"],
                 report["teacher_forced"]["argmax_agreement"], report["teacher_forced"]["mean_abs_logprob_diff"],
                 report["teacher_forced"]["max_abs_logprob_diff"], report["teacher_forced"]["mean_kl"])
    results["measure_s"] = time.monotonic() - started
    if len(lengths) == 1:
        results.update({"greedy": results["by_length"][0]["greedy"],
                        "teacher_forced": results["by_length"][0]["teacher_forced"]})
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("kv_cache_dtype", "baseline_kv_cache_dtype", "load_s", "measure_s")}
                     | {"by_length": results["by_length"]}, indent=1))


if __name__ == "__main__":
    main()
