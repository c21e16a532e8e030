"""The router's two hot paths, measured on the code the router runs:

1. One placement decision against a synthetic cluster of 1,000 workers whose index holds 1M pages: hashing the
   prompt's pages, then the router's own ``_place`` (index lookup, eligibility, scoring every worker, metrics).
   Prompts: an agentic follow-up turn of a 50K-token conversation held by one worker (the index walk goes
   3,125 pages deep), a fresh 50K-token prompt behind a system prompt every worker holds, a 1K-token prompt.
   The peer for the hashing step: the blake2b page-by-page chain the engine used before, on the same prompt.
2. Cache events one router ingests per second: decoding + applying batches to the index (realistic event
   mixes from real prefix-cache trees under memory pressure), then end to end through a real redis-server
   (the router's ClusterSync following 100 workers' streams), against reading and decoding the same streams
   without an index in the same run (the transport and parsing alone: what is left is the index's work).

    python -m loadtest.bench_router --out loadtest/results/router_cpu.json

Writes JSON and a PNG. Needs ``redis-server`` on PATH for the end-to-end part (``--no-redis`` skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import random
import statistics
import subprocess
import threading
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

from services.cluster.publisher import redis_client
from services.cluster.schema import EventBatch, Keys, WorkerRecord, decode_events, encode_events
from services.common.page_hash import ROOT_HASH, SCHEME, page_hashes
from services.engine.allocator import IdPool
from services.engine.radix_cache import CacheEvent, RadixCache
from services.router.config import RouterConfig
from services.router.index import CacheIndex
from services.router.metrics import RouterMetrics
from services.router.server import RouterService
from services.router.sync import ClusterSync
from services.router.workers import WorkerTable

PAGE = 16
CHECKPOINT_PAGES = 8  # the engine's default checkpoint interval: 128 tokens
VOCAB = 151_936


def _record(i: int, role: str, rng: random.Random) -> WorkerRecord:
    return WorkerRecord(
        instance_id=f"w{i:04d}", role=role, address=f"10.{i // 250}.{i % 250}.1:50051", model="bench",
        fingerprint="fp", hash_scheme=SCHEME, page_size=PAGE, max_running=64, max_waiting=256, max_model_len=262_144,
        pages_total=300_000, slots_total=64, remote_prefill_threshold=512, metrics_address="", started_at=0.0,
        queued_prefill_tokens=rng.randrange(0, 20_000), direct_requests=rng.randrange(0, 8),
    )


def _chain_events(hashes: list[int], parent: int = ROOT_HASH) -> list[CacheEvent]:
    """A path of pages as a pod stores it: every page, a checkpoint every CHECKPOINT_PAGES and at the end."""
    events = []
    for depth, h in enumerate(hashes, start=1):
        events.append(CacheEvent("stored", h, parent, False))
        if depth % CHECKPOINT_PAGES == 0 or depth == len(hashes):
            events.append(CacheEvent("state_stored", h, parent, True))
        parent = h
    return events


def _apply(index: CacheIndex, worker: str, events: list[CacheEvent], batch: int = 512) -> None:
    for start in range(0, len(events), batch):
        index.apply(worker, decode_events(encode_events(events[start : start + batch])))


def build_cluster(num_workers: int, num_prefill: int, total_pages: int, rng: random.Random):
    """1,000 workers; a 2K-token system prompt on every one; 50K-token conversations, each on one decode
    worker, until the index holds ``total_pages`` distinct pages. A few conversations have real tokens (the
    prompts placed); the others are random chains (same shape in the index)."""
    index = CacheIndex()
    table = WorkerTable(index, model="bench", hash_scheme=SCHEME, page_size=PAGE, ttl_s=1e9)
    table.update([_record(i, "prefill" if i < num_prefill else "decode", rng) for i in range(num_workers)], now=0.0)
    names = sorted(table.workers)
    system = [rng.randrange(VOCAB) for _ in range(2048)]
    system_hashes = page_hashes(system, PAGE)
    for name in names:
        _apply(index, name, _chain_events(system_hashes))
    conversation_pages = 50_000 // PAGE
    real = []
    for c in range((total_pages - len(system_hashes)) // conversation_pages):
        holder = names[num_prefill + c % (num_workers - num_prefill)]
        if c < 20:
            tokens = system + [rng.randrange(VOCAB) for _ in range(50_000 - len(system))]
            hashes = page_hashes(tokens, PAGE)
            real.append((tokens, holder))
        else:
            hashes = system_hashes + [rng.getrandbits(64) for _ in range(conversation_pages - len(system_hashes))]
        _apply(index, holder, _chain_events(hashes[len(system_hashes) :], parent=system_hashes[-1]))
        if c % 50 == 0:
            print(f"  index: {index.num_pages:,} pages", flush=True)
    return index, table, system, real


def blake2b_chain(tokens: list[int]) -> list[int]:
    """The engine's page hash before the vectorised one (blake2b page by page), as the peer."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) // PAGE * PAGE, PAGE):
        digest = hashlib.blake2b(digest_size=8)
        digest.update(parent.to_bytes(8, "little"))
        digest.update(array("q", tokens[start : start + PAGE]).tobytes())
        parent = int.from_bytes(digest.digest(), "little")
        hashes.append(parent)
    return hashes


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1e3, "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
            "mean_ms": statistics.fmean(ordered) * 1e3}


def bench_decisions(num_workers: int, total_pages: int, repeats: int, rng: random.Random) -> dict:
    print(f"[decisions] building an index of {total_pages:,} pages over {num_workers} workers", flush=True)
    started = time.perf_counter()
    index, table, system, real = build_cluster(num_workers, num_workers // 10, total_pages, rng)
    built = time.perf_counter() - started
    config = RouterConfig(model="tiny-qwen3.5-moe", served_model_name="bench", page_size=PAGE, session_ttl_s=1e9)
    metrics = RouterMetrics(lambda: {})
    service = RouterService(config, table, SimpleNamespace(up=True, router_id="bench"), metrics)
    # Live conversations between turns, four per decode pod as in an agentic cluster: every decision scores them
    # (the session and memory terms); the follow-ups are turns of conversations the table holds.
    decodes = [w.name for w in table.by_role("decode")]
    for i, name in enumerate(decodes * 4):
        service.sessions.placed(f"live{i}", name, time.monotonic(), 50_000)
        service.sessions.answered(f"live{i}", time.monotonic())
    for c, (tokens, holder) in enumerate(real):
        service.sessions.placed(f"real{c}", holder, time.monotonic(), len(tokens))
        service.sessions.answered(f"real{c}", time.monotonic())
    prompts = {
        "follow_up_50k": [(tokens + [rng.randrange(VOCAB) for _ in range(800)], holder, f"real{c}")
                          for c, (tokens, holder) in enumerate(real)],
        "fresh_50k": [(system + [rng.randrange(VOCAB) for _ in range(48_000)], None, "") for _ in range(5)],
        "short_1k": [(system[:256] + [rng.randrange(VOCAB) for _ in range(768)], None, "") for _ in range(5)],
    }
    results = {}
    for kind, cases in prompts.items():
        hash_s, place_s, total_s, right = [], [], [], 0
        for i in range(repeats):
            prompt, holder, session_id = cases[i % len(cases)]
            session_id = session_id or f"{kind}{i}"  # a new conversation
            t0 = time.perf_counter()
            hashes = page_hashes(prompt, PAGE)
            t1 = time.perf_counter()
            placement = service._place(prompt, hashes, session_id, set())
            t2 = time.perf_counter()
            service.sessions.answered(session_id, time.monotonic())
            hash_s.append(t1 - t0)
            place_s.append(t2 - t1)
            total_s.append(t2 - t0)
            right += holder is None or placement.decode.name == holder
        peer = []
        for prompt, *_ in cases[:3]:
            t0 = time.perf_counter()
            blake2b_chain(prompt)
            peer.append(time.perf_counter() - t0)
        results[kind] = {
            "prompt_tokens": len(cases[0][0]), "hash": _percentiles(hash_s), "place": _percentiles(place_s),
            "total": _percentiles(total_s), "blake2b_chain_hash_ms": statistics.median(peer) * 1e3,
            "hash_speedup_vs_blake2b": statistics.median(peer) / statistics.median(hash_s),
            "placed_on_holder": right / repeats,
        }
        r = results[kind]
        print(f"[decisions] {kind}: hash p50 {r['hash']['p50_ms']:.2f} ms (blake2b chain "
              f"{r['blake2b_chain_hash_ms']:.2f}), place p50 {r['place']['p50_ms']:.2f} / p99 "
              f"{r['place']['p99_ms']:.2f} ms, total p99 {r['total']['p99_ms']:.2f} ms", flush=True)
    return {"workers": num_workers, "distinct_pages": index.num_pages, "page_entries": index.num_page_entries,
            "index_build_s": built, "repeats": repeats, "queries": results}


def pod_event_batches(num_conversations: int, pool_pages: int, rng: random.Random) -> list[EventBatch]:
    """A pod's event batches over an agentic workload that overflows its cache: conversations of 50K tokens
    plus 10 follow-up turns, prefilled in 8K-token chunks (one batch each), their pages and checkpoints
    stored by the real prefix-cache tree, which evicts under pressure as the engine's does."""
    pages = IdPool(pool_pages, "pages")
    slots = IdPool(pool_pages // CHECKPOINT_PAGES, "checkpoints", first_id=1_000_000)
    tree = RadixCache(PAGE, pages, slots)
    batches, seq = [], 0
    for _ in range(num_conversations):
        tokens = [rng.randrange(VOCAB) for _ in range(50_000)]
        for turn in range(11):
            if turn:
                tokens += [rng.randrange(VOCAB) for _ in range(800)]
            hashes = page_hashes(tokens, PAGE)
            for end in range(0, len(hashes), 512):  # 8K-token chunks
                chunk = hashes[: end + 512]
                match = tree.match(tokens, chunk, max_pages=len(chunk))
                tree.lock(match.node)
                need = len(chunk) - match.num_kv_pages
                if not pages.can_allocate(need):
                    tree.evict_pages(need - pages.num_free)
                tree.unlock(match.node)
                if not pages.can_allocate(need):
                    continue
                path = []
                node = tree.node_at(tokens, chunk, match.num_kv_pages)
                while node is not None and node.depth:
                    path.append(node.page_id)
                    node = node.parent
                node = tree.insert(tokens, chunk, path[::-1] + pages.allocate(need))
                targets = []
                while node is not None and node.depth:
                    if node.depth % CHECKPOINT_PAGES == 0 and node.state_slot is None:
                        targets.append(node)
                    node = node.parent
                if len(targets) > slots.num_free:
                    tree.evict_states(len(targets) - slots.num_free)  # once: each call scans the tree
                for target in reversed(targets):
                    if target.state_slot is None and slots.can_allocate(1):
                        tree.attach_state(target, slots.allocate_one())
                events = list(tree.events)
                tree.events.clear()
                if events:
                    seq += 1
                    batches.append(EventBatch(seq, encode_events(events), tree.digest))
    return batches


def bench_ingest_index(batches: list[EventBatch], repeats: int) -> dict:
    counts = [sum(len(s) for s in decode_events(b.events)) for b in batches]
    kinds = {"stored": 0, "evicted": 0, "state_stored": 0, "state_evicted": 0}
    for b in batches:
        for s in decode_events(b.events):
            kinds["stored"] += len(s.stored)
            kinds["evicted"] += len(s.evicted)
            kinds["state_stored"] += len(s.state_stored)
            kinds["state_evicted"] += len(s.state_evicted)
    rates = []
    for _ in range(repeats):
        index = CacheIndex()
        started = time.perf_counter()
        for b in batches:
            index.apply("w", decode_events(b.events))
        rates.append(sum(counts) / (time.perf_counter() - started))
    assert index.digest("w") == batches[-1].digest, "the index must end equal to the pod's cache"
    return {"batches": len(batches), "events": sum(counts), "events_per_batch": sum(counts) / len(batches),
            "mix": kinds, "events_per_s": statistics.median(rates)}


def _start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its log pipe drained
            return proc
    raise RuntimeError(f"redis-server did not start on port {port}")


async def _fill_streams(url: str, keys: Keys, workers: list[str], batches: list[EventBatch]) -> None:
    r = redis_client(url, timeout_s=30)
    pipe = r.pipeline(transaction=False)
    rng = random.Random(1)
    for i, name in enumerate(workers):
        record = _record(i, "decode", rng)
        record = WorkerRecord(**{**record.__dict__, "instance_id": name, "event_seq": batches[-1].seq,
                                 "cache_pages": batches[-1].digest.pages, "cache_states": batches[-1].digest.states,
                                 "cache_page_sum": batches[-1].digest.page_sum,
                                 "cache_state_sum": batches[-1].digest.state_sum})
        pipe.hset(keys.worker(name), mapping=record.to_fields())
        pipe.sadd(keys.workers, name)
        for batch in batches:
            pipe.xadd(keys.events(name), batch.to_fields())
        if i % 10 == 9:
            await pipe.execute()
            pipe = r.pipeline(transaction=False)
    await pipe.execute()
    await r.aclose()


async def _raw_xread(url: str, keys: Keys, workers: list[str], decode: bool) -> tuple[int, float]:
    """Read every stream to its end (and decode the batches, if asked) without touching an index."""
    r = redis_client(url, timeout_s=30)
    ids = {keys.events(name): b"0-0" for name in workers}
    entries = 0
    started = time.perf_counter()
    while True:
        response = await r.xread(ids, count=512)
        if not response:
            break
        for stream, items in response:
            entries += len(items)
            ids[stream.decode()] = items[-1][0]
            if decode:
                for _, fields in items:
                    decode_events(EventBatch.from_fields(fields).events)
    elapsed = time.perf_counter() - started
    await r.aclose()
    return entries, elapsed


async def _router_ingest(url: str, workers: list[str], total_events: int) -> float:
    index = CacheIndex()
    table = WorkerTable(index, model="bench", hash_scheme=SCHEME, page_size=PAGE, ttl_s=1e9)
    sync = ClusterSync(url, "bench", "bench-router", table, poll_interval_s=0.05, ttl_s=1e9)
    await sync.poll()  # the registry once: every worker known before the clock starts
    started = time.perf_counter()
    sync.start()
    while index.events_applied < total_events:
        await asyncio.sleep(0.005)  # polling the benchmark's own counter, not synchronising the code measured
    elapsed = time.perf_counter() - started
    await sync.stop()
    assert all(w.feed.in_sync and index.digest(w.name) == w.record.digest for w in table.workers.values())
    return elapsed


def bench_ingest_redis(batches: list[EventBatch], num_workers: int, port: int) -> dict:
    proc = _start_redis(port)
    url, keys = f"redis://127.0.0.1:{port}/0", Keys("bench")
    try:
        workers = [f"pod{i:03d}" for i in range(num_workers)]
        print(f"[ingest] filling {num_workers} streams with {len(batches)} batches each", flush=True)
        asyncio.run(_fill_streams(url, keys, workers, batches))
        total = num_workers * sum(sum(len(s) for s in decode_events(b.events)) for b in batches)
        entries, raw_s = asyncio.run(_raw_xread(url, keys, workers, decode=False))
        _, decoded_s = asyncio.run(_raw_xread(url, keys, workers, decode=True))
        router_s = asyncio.run(_router_ingest(url, workers, total))
    finally:
        proc.kill()
        proc.wait()
    return {"workers": num_workers, "entries": entries, "events": total, "raw_xread_s": raw_s,
            "raw_xread_events_per_s": total / raw_s, "xread_decode_events_per_s": total / decoded_s,
            "router_s": router_s, "router_events_per_s": total / router_s,
            "router_over_xread_decode": decoded_s / router_s}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    queries = results["decisions"]["queries"]
    labels = list(queries)
    for i, (part, color) in enumerate((("hash", "tab:blue"), ("place", "tab:orange"), ("total", "tab:green"))):
        left.bar([x + (i - 1) * 0.27 for x in range(len(labels))], [queries[k][part]["p99_ms"] for k in labels],
                 0.27, label=f"{part} p99", color=color)
    left.bar([x + 0.54 for x in range(len(labels))], [queries[k]["blake2b_chain_hash_ms"] for k in labels], 0.27,
             label="hash, blake2b chain (before)", color="tab:gray")
    left.axhline(2.0, color="k", linestyle="--", label="goal: decision p99 2 ms")
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("ms")
    left.set_title(f"one decision, {results['decisions']['workers']} workers, "
                   f"{results['decisions']['distinct_pages'] / 1e6:.2f}M pages", fontsize=10)
    left.legend(fontsize=8)
    bars = [("index (decode + apply)", results["ingest_index"]["events_per_s"])]
    if "ingest_redis" in results:
        bars += [("through Redis (router)", results["ingest_redis"]["router_events_per_s"]),
                 ("XREAD + decode, no index", results["ingest_redis"]["xread_decode_events_per_s"])]
    colors = ["tab:blue", "tab:orange", "tab:gray"][: len(bars)]
    right.bar([b[0] for b in bars], [b[1] / 1e3 for b in bars], color=colors)
    right.axhline(500, color="k", linestyle="--", label="goal: 500k events/s")
    right.set_ylabel("thousand page events / s")
    right.set_title("cache events one router ingests", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(results["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=300, help="decisions timed per prompt kind")
    parser.add_argument("--conversations", type=int, default=6, help="per pod, for the event mix")
    parser.add_argument("--pool-pages", type=int, default=6_000, help="the pod cache in pages (< working set)")
    parser.add_argument("--stream-workers", type=int, default=100)
    parser.add_argument("--redis-port", type=int, default=6411)
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/router_cpu.json"))
    args = parser.parse_args()
    rng = random.Random(0)
    results = {"machine": f"{platform.processor() or platform.machine()}, {platform.node()}, "
                          f"python {platform.python_version()}"}
    results["decisions"] = bench_decisions(args.workers, args.pages, args.repeats, rng)
    print("[ingest] generating a pod's event batches from a real prefix-cache tree", flush=True)
    batches = pod_event_batches(args.conversations, args.pool_pages, rng)
    results["ingest_index"] = bench_ingest_index(batches, repeats=3)
    print(f"[ingest] index: {results['ingest_index']['events_per_s'] / 1e3:.0f}k events/s "
          f"({results['ingest_index']['events_per_batch']:.0f} events a batch)", flush=True)
    if not args.no_redis:
        results["ingest_redis"] = bench_ingest_redis(batches, args.stream_workers, args.redis_port)
        r = results["ingest_redis"]
        print(f"[ingest] through Redis: {r['router_events_per_s'] / 1e3:.0f}k events/s; XREAD + decode alone "
              f"{r['xread_decode_events_per_s'] / 1e3:.0f}k ({r['router_over_xread_decode']:.2f} of it), raw XREAD "
              f"{r['raw_xread_events_per_s'] / 1e3:.0f}k", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
