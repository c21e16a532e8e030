"""Single-request decode speed of the engine, against the HBM roofline measured in the same run.

    python -m loadtest.bench_decode --model qwen3.5-35b-a3b:20 --contexts 1024,32768 --out decode.json
    python -m loadtest.bench_decode --kv-cache-dtype fp8_e4m3 --contexts 1024,32768,131072 --out decode_fp8.json

For each context length: prefill a random prompt of that length, then time each decode step (one
``Engine.step()``, host included, as a user would see it). The roofline is the fewest bytes a decode
step must move (``loadtest.model_costs``: weights actually read for one token -- the dense parts, the top-k
experts of each MoE layer, the LM head --, the GDN states read and written, the KV of the context at the KV
cache's bytes per element, the logits) over the device-to-device copy bandwidth measured in this run. Writes
JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from kernels.bench_util import grouped_bar_chart, measure_copy_bandwidth
from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.model_config import ModelConfig
from services.engine.request import SamplingParams

from .model_costs import decode_step_bytes

log = logging.getLogger("bench_decode")


def single_request_config(model: str, max_model_len: int, prefill_chunk_size: int, **overrides) -> EngineConfig:
    """A dummy bf16 model on the GPU, sized for one request: what the decode benchmarks measure."""
    return EngineConfig(
        model=model, load_format="dummy", device="cuda", dtype="bfloat16", max_num_seqs=4,
        prefill_chunk_size=prefill_chunk_size, max_num_batched_tokens=prefill_chunk_size,
        max_model_len=max_model_len, **overrides,
    )


def decode_bytes_per_token(model: torch.nn.Module, cfg: ModelConfig, context: int, dtype: torch.dtype,
                           kv_dtype: torch.dtype | None = None) -> dict:
    """The fewest bytes one decode step of one request must move through device memory (its top-k experts)."""
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    num_moe = sum(name.endswith(".w13") for name, _ in params)
    return decode_step_bytes(params, cfg, dtype, [context], [cfg.num_experts_per_tok] * num_moe, kv_dtype)


def run_context(engine: Engine, context: int, decode_tokens: int, warmup: int, seed: int) -> dict:
    vocab = engine.model_config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(max_tokens=warmup + decode_tokens, temperature=0, ignore_eos=True)
    engine.add_request(prompt, params)
    t0 = time.perf_counter()
    step_times, generated, token_ids = [], 0, []
    ttft = None
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        for out in outputs:
            generated += len(out.new_token_ids)
            token_ids += out.new_token_ids
            if ttft is None and out.new_token_ids:
                ttft = time.perf_counter() - t0
                log.info("context %d: prefill done in %.2fs", context, ttft)
            elif generated > warmup + 1:
                step_times.append(elapsed)
        if generated and generated % 32 == 0 and outputs:
            log.info("context %d: %d/%d tokens", context, generated, warmup + decode_tokens)
    median = statistics.median(step_times)
    return {
        "context": context,
        "ttft_s": ttft,
        "decode_steps_timed": len(step_times),
        "step_ms_median": median * 1e3,
        "step_ms_p90": sorted(step_times)[int(0.9 * (len(step_times) - 1))] * 1e3,
        "tokens_per_s": 1.0 / median,
        "token_ids": token_ids,  # greedy: two runs of the same code path and weights must agree
    }


def plot(results: dict, path: Path) -> None:
    runs = results["runs"]
    grouped_bar_chart(
        path, [f"{r['context'] // 1024}K" for r in runs],
        [("measured", [r["tokens_per_s"] for r in runs]), ("HBM roofline", [r["roofline_tokens_per_s"] for r in runs])],
        xlabel="context", ylabel="decode tokens/s (1 request)",
        title=f"{results['model']} on {results['gpu']} ({results['backend']})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b:20")
    parser.add_argument("--contexts", default="1024")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--prefill-chunk-size", type=int, default=4096)
    parser.add_argument("--kernels", default="auto", help="auto (GPU kernels), torch, gpu")
    parser.add_argument("--cuda-graphs", type=int, default=64, help="CUDA graphs up to this batch size (0: off)")
    parser.add_argument("--overlap", type=int, default=1, help="1: launch each step before processing the last")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8_e4m3")
    parser.add_argument("--decode-attention", default="auto",
                        help="auto (flashinfer) or triton (the fused Triton attention block on decode steps)")
    parser.add_argument("--out", default="decode.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    contexts = [int(c) for c in args.contexts.split(",")]
    config = single_request_config(
        args.model, max(contexts) + args.warmup + args.decode_tokens + 16, args.prefill_chunk_size,
        kernels=args.kernels, cuda_graph_max_batch=args.cuda_graphs, overlap_schedule=bool(args.overlap),
        kv_cache_dtype=args.kv_cache_dtype, decode_attention=args.decode_attention,
    )
    device = config.torch_device
    bandwidth = measure_copy_bandwidth(device)
    log.info("device-to-device copy: %.0f GB/s (read + write)", bandwidth / 1e9)
    engine = Engine(config)
    graphs_on = engine.runner.graphs is not None and engine.runner.graphs.enabled
    results = {
        "benchmark": "single-request decode",
        "model": args.model,
        "backend": f"{engine.runner.ops.name}, CUDA graphs {'on' if graphs_on else 'off'}, "
                   f"overlap {'on' if args.overlap else 'off'}, KV {args.kv_cache_dtype}, "
                   f"decode attention {args.decode_attention}",
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_pages": engine.runner.num_pages,
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "runs": [],
    }
    for i, context in enumerate(contexts):
        run = run_context(engine, context, args.decode_tokens, args.warmup, seed=i)
        traffic = decode_bytes_per_token(engine.runner.model, engine.model_config, context, config.torch_dtype,
                                         config.kv_torch_dtype)
        run["bytes_per_token"] = traffic
        run["roofline_tokens_per_s"] = bandwidth / traffic["total"]
        run["fraction_of_roofline"] = run["tokens_per_s"] / run["roofline_tokens_per_s"]
        results["runs"].append(run)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"{'context':>8} {'tok/s':>8} {'roofline':>9} {'frac':>6} {'step ms':>8} {'ttft s':>7}")
    for r in results["runs"]:
        print(f"{r['context']:>8} {r['tokens_per_s']:>8.1f} {r['roofline_tokens_per_s']:>9.1f} "
              f"{r['fraction_of_roofline']:>6.2f} {r['step_ms_median']:>8.2f} {r['ttft_s']:>7.2f}")


if __name__ == "__main__":
    main()
