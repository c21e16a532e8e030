"""State hand-over throughput: a real KV + GDN state hand-over between two processes' pools, against a raw
Mooncake batch write of the same number of bytes in the same run.

    python -m loadtest.bench_transfer --model qwen3.5-35b-a3b --contexts 4096,16384,32768 --out transfer.json

Two processes (sender = prefill pod's pools, receiver = decode pod's pools, each registered with its own
Mooncake TransferEngine, TCP by default). For each context length, the hand-over is what the prefill pod
sends for a fresh prompt: every page of every full-attention layer, then one slot of conv and SSM state,
built by services.transfer.handover exactly as the pods build it. Two page allocations: contiguous (a
fresh pool) and scattered (random page ids, as after cache churn: many descriptors). The raw write moves
the same byte count as one descriptor. Writes JSON and a PNG; ``--device cuda`` puts the pools in GPU
memory (needs Mooncake's CUDA build).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from kernels.bench_util import grouped_bar_chart
from services.engine.model_config import ModelConfig
from services.engine.presets import preset_config
from services.engine.state_cache import KVCache, StateCache
from services.transfer.engine import TransferConfig, TransferEngine, coalesce
from services.transfer.handover import PoolRegions, handover_regions

log = logging.getLogger("bench_transfer")


def _pools(cfg: ModelConfig, num_pages: int, page_size: int, device: str):
    """KV pool, state pool, and a flat buffer as large as both for the raw writes."""
    kv = KVCache(cfg, num_pages, page_size, torch.bfloat16, device)
    kv.buffer.random_(0, 100)  # real bytes, not zeros
    states = StateCache(cfg, 2, torch.bfloat16, device)
    states.ssm.normal_()
    raw_bytes = kv.buffer.numel() * kv.buffer.element_size() + StateCache.bytes_per_slot(cfg, torch.bfloat16) * 2
    raw = torch.randint(0, 255, (raw_bytes,), dtype=torch.uint8, device=device)
    return kv, states, raw


def _regions(kv: KVCache, states: StateCache) -> PoolRegions:
    return PoolRegions(
        kv_base=kv.buffer.data_ptr(), kv_num_pages=kv.num_pages,
        kv_page_bytes=kv.buffer[0, 0].numel() * kv.buffer.element_size(), num_attn_layers=kv.buffer.shape[0],
        conv_base=states.conv.data_ptr(), conv_slot_bytes=states.conv[0].numel() * states.conv.element_size(),
        ssm_base=states.ssm.data_ptr(), ssm_slot_bytes=states.ssm[0].numel() * 4, num_slots=states.num_slots,
    )


def _receiver(model: str, num_pages: int, page_size: int, device: str, conn) -> None:
    cfg = preset_config(model)
    kv, states, raw = _pools(cfg, num_pages, page_size, device)
    engine = TransferEngine(TransferConfig(timeout_s=120))
    for tensor in (kv.buffer, states.conv, states.ssm, raw):
        engine.register(tensor)
    conn.send((engine.session_id, _regions(kv, states), raw.data_ptr()))
    conn.recv()  # told to exit
    engine.close()


def _time_write(engine: TransferEngine, session: str, src, dst, lengths, reps: int) -> float:
    engine.write(session, src, dst, lengths)  # warm-up (first contact, connections)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        engine.write(session, src, dst, lengths)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plot(results: dict, path: Path) -> None:
    runs = results["runs"]
    series = [(label, [r[key] for r in runs]) for key, label in (
        ("handover_contiguous_GBps", "hand-over, contiguous pages"),
        ("handover_scattered_GBps", "hand-over, scattered pages"),
        ("raw_GBps", "raw write, same bytes"),
    )]
    grouped_bar_chart(
        path, [f"{r['context'] // 1024}K" for r in runs], series, xlabel="prompt length", ylabel="GB/s",
        title=f"{results['model']} state hand-over, {results['protocol']} on {results['device_name']}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="transfer.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cfg = preset_config(args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    num_pages = -(-max(contexts) // args.page_size) + 8
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(args.model, num_pages, args.page_size, args.device, child))
    receiver.start()
    try:
        kv, states, raw_src = _pools(cfg, num_pages, args.page_size, args.device)
        engine = TransferEngine(TransferConfig(timeout_s=120))
        for tensor in (kv.buffer, states.conv, states.ssm, raw_src):
            engine.register(tensor)
        session, dst_regions, raw_dst = parent.recv()
        src_regions = _regions(kv, states)
        generator = torch.Generator().manual_seed(0)
        results = {
            "benchmark": "state hand-over", "model": args.model, "protocol": "tcp", "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "page_size": args.page_size, "runs": [],
        }
        for context in contexts:
            pages = -(-context // args.page_size)
            contiguous = list(range(pages))
            scattered_src = torch.randperm(num_pages, generator=generator)[:pages].tolist()
            scattered_dst = torch.randperm(num_pages, generator=generator)[:pages].tolist()
            run = {"context": context, "pages": pages}
            for name, src_pages, dst_pages in (("contiguous", contiguous, contiguous),
                                               ("scattered", scattered_src, scattered_dst)):
                src, dst, lengths = handover_regions(src_regions, dst_regions, src_pages, dst_pages, [(0, 1)])
                run["bytes"] = sum(lengths)
                run[f"descriptors_{name}"] = len(coalesce(src, dst, lengths)[2])
                seconds = _time_write(engine, session, src, dst, lengths, args.reps)
                run[f"handover_{name}_GBps"] = run["bytes"] / seconds / 1e9
                log.info("context %d: %s hand-over of %.1f MB in %.1f ms", context, name, run["bytes"] / 1e6,
                         seconds * 1e3)
            raw = _time_write(engine, session, [raw_src.data_ptr()], [raw_dst], [run["bytes"]], args.reps)
            run["raw_GBps"] = run["bytes"] / raw / 1e9
            run["ratio_contiguous_to_raw"] = run["handover_contiguous_GBps"] / run["raw_GBps"]
            run["ratio_scattered_to_raw"] = run["handover_scattered_GBps"] / run["raw_GBps"]
            results["runs"].append(run)
        out = Path(args.out)
        out.write_text(json.dumps(results, indent=2))
        plot(results, out.with_suffix(".png"))
        print(f"{'context':>8} {'MB':>8} {'desc(scat)':>10} {'contig GB/s':>11} {'scat GB/s':>10} {'raw GB/s':>9} "
              f"{'contig/raw':>10} {'scat/raw':>9}")
        for r in results["runs"]:
            print(f"{r['context']:>8} {r['bytes'] / 1e6:>8.1f} {r['descriptors_scattered']:>10} "
                  f"{r['handover_contiguous_GBps']:>11.2f} {r['handover_scattered_GBps']:>10.2f} {r['raw_GBps']:>9.2f} "
                  f"{r['ratio_contiguous_to_raw']:>10.2f} {r['ratio_scattered_to_raw']:>9.2f}")
        engine.close()
    finally:
        parent.send("exit")
        receiver.join(timeout=60)


if __name__ == "__main__":
    main()
