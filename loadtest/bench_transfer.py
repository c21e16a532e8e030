"""State hand-over throughput: a real KV + GDN state hand-over between two processes' pools, against a raw
Mooncake batch write of the same number of bytes in the same run.

    python -m loadtest.bench_transfer --model qwen3.5-35b-a3b --contexts 4096,16384,32768 --out transfer.json

Two processes (sender = prefill pod's pools, receiver = decode pod's pools, each registered with its own
Mooncake TransferEngine, TCP by default). For each context length, the hand-over is what the prefill pod
sends for a fresh prompt: every page of every full-attention layer, then two slots of conv and SSM state
(the final state and the state at the prompt's resume boundary, which lets the decode pod serve the same
prompt again from its cache), built by services.transfer.handover exactly as the pods build it. Page
placements, on both pods:

- contiguous: fresh pools, pages 0..n-1;
- churned: pools fragmented by a simulated request churn (requests of 1-128 pages arriving, growing a page
  at a time while decoding, and leaving in random order, until ``--churn-occupancy`` of the pool is taken),
  then the hand-over's pages taken as the pods take them: by the run allocator (``IdPool.allocate_runs``,
  prefill chunks on the prefill pod, all destination pages at once on the decode pod), and, for comparison,
  by the LIFO free list the pods used before (``lifo``), on the same churn with LIFO allocation throughout;
- random: every page id drawn at random (a pool so fragmented that no two free pages are adjacent: one
  descriptor per page per layer, the worst case).

The reference is a raw Mooncake batch write of the same bytes between plain buffers, as one descriptor and
as 16 equal ones (over TCP one huge descriptor uses fewer of Mooncake's lanes and can be the slower: the
ratios are against the faster of the two). The variants and the raw writes are timed in alternation (each
repetition times every one once), so that load from other processes on a shared machine falls on all of
them alike; each of ``--trials`` fresh process pairs (new pools, new Mooncake engines) times every context,
and the ratios reported are medians over the trials (the per-trial values are kept in the JSON). Writes JSON
and a PNG;
``--device cuda`` puts the pools in GPU memory (needs Mooncake's CUDA build).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.bench_util import grouped_bar_chart
from services.engine.allocator import IdPool
from services.engine.config import EngineConfig
from services.engine.model_config import ModelConfig
from services.engine.presets import preset_config
from services.engine.state_cache import KVCache, StateCache
from services.transfer.engine import TransferConfig, TransferEngine, coalesce
from services.transfer.handover import PoolRegions, handover_regions

log = logging.getLogger("bench_transfer")

NUM_SLOTS = 4  # source: final state 0, resume-boundary state 2; destination: 1 and 3
# A prefill pod's chunk at the engine's default (8192 tokens: 512 pages of 16), allocated chunk by chunk.
PREFILL_CHUNK_TOKENS = EngineConfig.__dataclass_fields__["prefill_chunk_size"].default


def _pools(cfg: ModelConfig, num_pages: int, page_size: int, raw_bytes: int, device: str):
    """KV pool, state pool, and a flat buffer for the raw writes."""
    kv = KVCache(cfg, num_pages, page_size, torch.bfloat16, device)
    kv.buffer.random_(0, 100)  # real bytes, not zeros
    states = StateCache(cfg, NUM_SLOTS, torch.bfloat16, device)
    states.ssm.normal_()
    raw = torch.randint(0, 255, (raw_bytes,), dtype=torch.uint8, device=device)
    return kv, states, raw


def _regions(kv: KVCache, states: StateCache) -> PoolRegions:
    return PoolRegions(
        kv_base=kv.buffer.data_ptr(), kv_num_pages=kv.num_pages,
        kv_page_bytes=kv.buffer[0, 0].numel() * kv.buffer.element_size(), num_attn_layers=kv.buffer.shape[0],
        conv_base=states.conv.data_ptr(), conv_slot_bytes=states.conv[0].numel() * states.conv.element_size(),
        ssm_base=states.ssm.data_ptr(), ssm_slot_bytes=states.ssm[0].numel() * 4, num_slots=states.num_slots,
    )


def _receiver(model: str, num_pages: int, page_size: int, raw_bytes: int, device: str, conn) -> None:
    cfg = preset_config(model)
    kv, states, raw = _pools(cfg, num_pages, page_size, raw_bytes, device)
    engine = TransferEngine(TransferConfig(timeout_s=120))
    for tensor in (kv.buffer, states.conv, states.ssm, raw):
        engine.register(tensor)
    conn.send((engine.session_id, _regions(kv, states), raw.data_ptr()))
    conn.recv()  # told to exit
    engine.close()


# ---- page placements ------------------------------------------------------------------------------------
Allocate = Callable[[IdPool, int, int | None], list[int]]


def _lifo(pool: IdPool, count: int, after: int | None) -> list[int]:
    return pool.allocate(count)


def _runs(pool: IdPool, count: int, after: int | None) -> list[int]:
    return pool.allocate(1) if count == 1 else pool.allocate_runs(count, after=after)


def churned_pool(num_pages: int, occupancy: float, seed: int, allocate: Allocate) -> IdPool:
    """A pool after requests came and went: each arrives with a prompt of 1-128 pages (log-uniform), the
    live ones grow by a page now and then (decode), a random one leaves when the pool is past
    ``occupancy``. The same seed gives the same sequence of events whatever ``allocate`` does."""
    rng = random.Random(seed)
    pool = IdPool(num_pages, "churn")
    live: list[list[int]] = []
    for _ in range(20 * num_pages // 16):
        if pool.num_used > occupancy * num_pages and live:
            pool.free(live.pop(rng.randrange(len(live))))
            continue
        if live and rng.random() < 0.6:  # a decode step crosses a page boundary
            pages = live[rng.randrange(len(live))]
            if pool.can_allocate(1):
                pages.extend(allocate(pool, 1, pages[-1]))
            continue
        size = min(int(2 ** rng.uniform(0, 7)), pool.num_free)
        if size:
            live.append(allocate(pool, size, None))
    return pool


def handover_pages(pool: IdPool, count: int, allocate: Allocate, chunk: int | None) -> list[int]:
    """What a prefill pod (in chunks of ``chunk`` pages, each continuing the last) or a decode pod (all at
    once, ``chunk`` None) takes for a prompt of ``count`` pages."""
    pages: list[int] = []
    while len(pages) < count:
        take = count - len(pages) if chunk is None else min(chunk, count - len(pages))
        pages += allocate(pool, take, pages[-1] if pages else None)
    return pages


def placements(pages: int, num_pages: int, occupancy: float, seed: int,
               chunk_pages: int) -> dict[str, tuple[list[int], list[int]]]:
    """(source pages on the prefill pod, destination pages on the decode pod) per placement."""
    rng = random.Random(seed)
    out = {"contiguous": (list(range(pages)), list(range(pages)))}
    for name, allocate in (("churned_lifo", _lifo), ("churned_runs", _runs)):
        src_pool = churned_pool(num_pages, occupancy, seed + 1, allocate)
        dst_pool = churned_pool(num_pages, occupancy, seed + 2, allocate)
        out[name] = (handover_pages(src_pool, pages, allocate, chunk_pages),
                     handover_pages(dst_pool, pages, allocate, None))
    out["random"] = (rng.sample(range(num_pages), pages), rng.sample(range(num_pages), pages))
    return out


# ---- timing -----------------------------------------------------------------------------------------------
def _time_alternating(engine: TransferEngine, session: str, writes: dict[str, tuple], reps: int) -> dict[str, float]:
    """Median seconds per write of each named descriptor list, the writes timed in alternation."""
    for src, dst, lengths in writes.values():  # warm-up (first contact, connections)
        engine.write(session, src, dst, lengths)
    times: dict[str, list[float]] = {name: [] for name in writes}
    for _ in range(reps):
        for name, (src, dst, lengths) in writes.items():
            start = time.perf_counter()
            engine.write(session, src, dst, lengths)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


PLACEMENTS = ("contiguous", "churned_runs", "churned_lifo", "random")
RAW_PIECES = 16


def plot(results: dict, path: Path) -> None:
    runs = results["runs"]
    series = [(f"hand-over, {name}", [r[f"{name}_GBps"] for r in runs]) for name in PLACEMENTS]
    series.append(("raw write, same bytes (best of 1 and 16 descriptors)", [r["best_raw_GBps"] for r in runs]))
    grouped_bar_chart(
        path, [f"{r['context'] // 1024}K" for r in runs], series, xlabel="prompt length", ylabel="GB/s",
        title=f"{results['model']} state hand-over, {results['protocol']} on {results['device_name']}",
    )


def measure_trial(args: argparse.Namespace, cfg: ModelConfig, contexts: list[int], trial: int) -> dict:
    """One trial: a fresh receiver process and fresh pools on both sides, every context timed."""
    max_pages = -(-max(contexts) // args.page_size)
    num_pages = int(max_pages * args.pool_factor)
    slot_bytes = StateCache.bytes_per_slot(cfg, torch.bfloat16)
    raw_bytes = max_pages * KVCache.bytes_per_page(cfg, args.page_size, torch.bfloat16) + 2 * slot_bytes
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(args.model, num_pages, args.page_size, raw_bytes, args.device,
                                                   child))
    receiver.start()
    try:
        kv, states, raw_src = _pools(cfg, num_pages, args.page_size, raw_bytes, args.device)
        engine = TransferEngine(TransferConfig(timeout_s=120))
        for tensor in (kv.buffer, states.conv, states.ssm, raw_src):
            engine.register(tensor)
        session, dst_regions, raw_dst = parent.recv()
        src_regions = _regions(kv, states)
        runs = []
        for context in contexts:
            pages = -(-context // args.page_size)
            run = {"context": context, "pages": pages}
            writes = {}
            for name, (src_pages, dst_pages) in placements(pages, num_pages, args.churn_occupancy, args.seed + context,
                                                           PREFILL_CHUNK_TOKENS // args.page_size).items():
                src, dst, lengths = handover_regions(src_regions, dst_regions, src_pages, dst_pages, [(0, 1), (2, 3)])
                run["bytes"] = sum(lengths)
                run[f"descriptors_{name}"] = len(coalesce(src, dst, lengths)[2])
                writes[name] = (src, dst, lengths)
            writes["raw"] = ([raw_src.data_ptr()], [raw_dst], [run["bytes"]])
            piece = -(-run["bytes"] // RAW_PIECES)
            offsets = range(0, run["bytes"], piece)
            writes["raw_split"] = ([raw_src.data_ptr() + o for o in offsets], [raw_dst + o for o in offsets],
                                   [min(piece, run["bytes"] - o) for o in offsets])
            seconds = _time_alternating(engine, session, writes, args.reps)
            # The state at the resume boundary: what the hand-over carries beyond the prompt's KV and final state.
            run["resume_checkpoint_bytes"] = slot_bytes
            run["resume_checkpoint_fraction"] = slot_bytes / (run["bytes"] - slot_bytes)
            for name, s in seconds.items():
                run[f"{name}_GBps"] = run["bytes"] / s / 1e9
            run["best_raw_GBps"] = max(run["raw_GBps"], run["raw_split_GBps"])
            for name in PLACEMENTS:
                run[f"ratio_{name}_to_raw"] = run[f"{name}_GBps"] / run["best_raw_GBps"]
            log.info("trial %d, context %d: %s", trial, context,
                     {k: round(v, 3) for k, v in run.items() if k.startswith("ratio")})
            runs.append(run)
        engine.close()
        return {"pool_pages": num_pages, "slot_bytes": slot_bytes, "runs": runs}
    finally:
        parent.send("exit")
        receiver.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pool-factor", type=float, default=3.0, help="pool pages per page of the longest context")
    parser.add_argument("--churn-occupancy", type=float, default=0.6, help="pool fraction in use after the churn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=3, help="fresh process pairs; ratios are medians over them")
    parser.add_argument("--out", default="transfer.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cfg = preset_config(args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    trials = [measure_trial(args, cfg, contexts, trial) for trial in range(args.trials)]
    results = {
        "benchmark": "state hand-over", "model": args.model, "protocol": "tcp", "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "page_size": args.page_size, "pool_pages": trials[0]["pool_pages"], "churn_occupancy": args.churn_occupancy,
        "reps": args.reps, "trials": args.trials, "slot_bytes": trials[0]["slot_bytes"],
        "placements": list(PLACEMENTS), "runs": [],
    }
    for i, context in enumerate(contexts):
        per_trial = [t["runs"][i] for t in trials]
        # Medians over trials (fresh processes and pools each): buffer placement in physical memory differs
        # from one process to the next and moves a single trial's ratios by as much as +-10% on a small VM.
        run = {k: statistics.median(r[k] for r in per_trial) for k in per_trial[0]}
        run["context"], run["pages"] = context, per_trial[0]["pages"]
        run["trials"] = [{k: v for k, v in r.items() if k.startswith(("ratio", "raw", "best"))} for r in per_trial]
        log.info("context %d, median of %d trials: %s", context, args.trials,
                 {k: round(v, 3) for k, v in run.items() if k.startswith("ratio")})
        results["runs"].append(run)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    header = " ".join(f"{n:>13}" for n in PLACEMENTS)
    print(f"{'context':>8} {'MB':>7} {'+ckpt':>6} {header} {'raw GB/s':>9} {'raw16 GB/s':>10}")
    for r in results["runs"]:
        cells = [f"{r[f'ratio_{n}_to_raw']:.2f} ({r[f'descriptors_{n}']})" for n in PLACEMENTS]
        print(f"{r['context']:>8} {r['bytes'] / 1e6:>7.1f} {r['resume_checkpoint_fraction']:>6.1%} "
              + " ".join(f"{c:>13}" for c in cells) + f" {r['raw_GBps']:>9.2f} {r['raw_split_GBps']:>10.2f}")
    print("cells: hand-over GB/s as a fraction of the faster raw write's (coalesced descriptors)")


if __name__ == "__main__":
    main()
