"""The router's cache index and the feed that keeps it in step, against real prefix-cache trees (the same
logic the pods run): what the index says a worker can reuse is what that worker's own cache would give it."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cluster.schema import EventBatch, Segment, Snapshot, WorkerRecord, decode_events, encode_events
from services.common.page_hash import ROOT_HASH, extend_page_hashes, page_hashes
from services.engine.allocator import IdPool
from services.engine.radix_cache import CacheEvent, RadixCache
from services.router.feed import FeedState, WorkerFeed
from services.router.index import CacheIndex, InconsistentEvents
from services.router.policy import Candidate, Placer, Policy, Weights
from services.router.workers import WorkerTable

PAGE = 2


def _events(*events: tuple[str, int, int]) -> list[Segment]:
    cache_events = (CacheEvent(kind, h, parent, kind == "state_stored") for kind, h, parent in events)
    return decode_events(encode_events(cache_events))


class PodCache:
    """A pod's prefix cache as the engine drives it (insert paths, take checkpoints, evict under pressure),
    with its events numbered in batches as services/cluster/publisher.EventLog does."""

    def __init__(self, pages: int = 24, slots: int = 6) -> None:
        self.pages = IdPool(pages, "pages")
        self.slots = IdPool(slots, "checkpoints", first_id=100)
        self.tree = RadixCache(PAGE, self.pages, self.slots)
        self.seq = 0

    def insert(self, tokens: list[int], checkpoint_at: int | None) -> None:
        hashes = extend_page_hashes([], tokens, PAGE)
        match = self.tree.match(tokens, hashes, max_pages=len(hashes))
        self.tree.lock(match.node)
        needed = len(hashes) - match.num_kv_pages
        if not self.pages.can_allocate(needed):
            self.tree.evict_pages(needed - self.pages.num_free)
        self.tree.unlock(match.node)
        if not self.pages.can_allocate(needed):
            return
        kept = [n.page_id for n in self._path(tokens, hashes, match.num_kv_pages)]
        fresh = self.pages.allocate(needed)
        node = self.tree.insert(tokens, hashes, kept + fresh)
        if checkpoint_at is not None and hashes:
            depth = 1 + checkpoint_at % len(hashes)
            target = self.tree.node_at(tokens, hashes, depth)
            if target is not None and target.state_slot is None:
                if not self.slots.can_allocate(1):
                    self.tree.evict_states(1)
                if self.slots.can_allocate(1):
                    self.tree.attach_state(target, self.slots.allocate_one())
        del node

    def _path(self, tokens, hashes, depth):
        node = self.tree.node_at(tokens, hashes, depth)
        path = []
        while node is not None and node.depth:
            path.append(node)
            node = node.parent
        return path[::-1]

    def batch(self) -> EventBatch | None:
        events = list(self.tree.events)
        self.tree.events.clear()
        if not events:
            return None
        self.seq += 1
        return EventBatch(self.seq, encode_events(events), self.tree.digest)

    def snapshot(self) -> Snapshot:
        assert not self.tree.events, "a snapshot follows the last batch"
        return Snapshot(self.seq, encode_events(self.tree.snapshot()), self.tree.digest)


# Sequences over a small page alphabet, so that prompts share prefixes often.
sequences = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=6).map(
    lambda pages: [t for p in pages for t in (p, p + 10)]
)
operations = st.lists(
    st.tuples(st.integers(0, 2), sequences, st.one_of(st.none(), st.integers(0, 5)), st.integers(0, 3)),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.lists(sequences, min_size=1, max_size=6))
def test_index_usable_hits_equal_each_workers_own_match(ops, queries):
    pods = [PodCache(), PodCache(pages=12), PodCache(slots=2)]
    index = CacheIndex()
    for worker, tokens, checkpoint_at, evict_states in ops:
        pod = pods[worker]
        pod.insert(tokens, checkpoint_at)
        if evict_states:
            pod.tree.evict_states(evict_states)
        batch = pod.batch()
        if batch is not None:
            index.apply(f"w{worker}", decode_events(batch.events))
    for worker, pod in enumerate(pods):
        assert index.digest(f"w{worker}") == pod.tree.digest
    for tokens in queries:
        hashes = page_hashes(tokens, PAGE)
        usable = index.usable_pages(hashes)
        for worker, pod in enumerate(pods):
            match = pod.tree.match(tokens, hashes, max_pages=len(hashes))
            assert usable.get(f"w{worker}", 0) == match.node.depth
            assert index.kv_pages(f"w{worker}", hashes) == match.num_kv_pages


def test_kv_matched_past_the_last_checkpoint_is_not_counted():
    """The hybrid case: worker a holds 8 pages of the prompt's KV but a GDN checkpoint only at page 3;
    worker b holds 5 pages with a checkpoint at page 5. A KV-only router would prefer a."""
    hashes = page_hashes(list(range(20)), PAGE)  # 10 pages
    index = CacheIndex()
    stored = [("stored", h, hashes[i - 1] if i else ROOT_HASH) for i, h in enumerate(hashes)]
    index.apply("a", _events(*stored[:8], ("state_stored", hashes[2], hashes[1])))
    index.apply("b", _events(*stored[:5], ("state_stored", hashes[4], hashes[3])))
    assert index.kv_pages("a", hashes) == 8 and index.kv_pages("b", hashes) == 5
    assert index.usable_pages(hashes) == {"a": 3, "b": 5}
    placer = Placer(Policy.CACHE_AWARE, Weights(request=0))
    candidates = [Candidate(name, name, 0, 0, pages * PAGE) for name, pages in index.usable_pages(hashes).items()]
    assert placer.choose(candidates, prompt_tokens=20).name == "b"
    # Its checkpoint evicted, b's KV is worth nothing any more.
    index.apply("b", _events(("state_evicted", hashes[4], hashes[3])))
    assert index.usable_pages(hashes) == {"a": 3}


def test_a_shared_checkpoint_deeper_than_each_workers_own_wins():
    """a, b and c each hold a checkpoint of their own at a shallow page and share a deeper one with d, which
    also holds its own checkpoint deeper than the shared one. Every worker has one of its own, so none
    may be taken as settled before the shared one is seen."""
    h = page_hashes(list(range(24)), PAGE)  # 12 pages
    chain = [("stored", x, h[i - 1] if i else ROOT_HASH) for i, x in enumerate(h)]
    index = CacheIndex()
    for name, own in (("a", 2), ("b", 4), ("c", 1), ("d", 11)):
        events = [*chain, ("state_stored", h[7], h[6])]
        if own is not None:
            events.append(("state_stored", h[own], h[own - 1]))
        index.apply(name, _events(*events))
    assert index.usable_pages(h) == {"a": 8, "b": 8, "c": 8, "d": 12}


def test_events_that_break_a_workers_tree_are_refused():
    h = page_hashes(list(range(6)), PAGE)
    index = CacheIndex()
    with pytest.raises(InconsistentEvents, match="without their parent"):
        index.apply("w", _events(("stored", h[1], h[0])))
    index.replace("w", _events(("stored", h[0], ROOT_HASH), ("state_stored", h[0], ROOT_HASH)))
    with pytest.raises(InconsistentEvents, match="with a checkpoint"):
        index.apply("w", _events(("evicted", h[0], ROOT_HASH)))
    index.replace("w", _events(("stored", h[0], ROOT_HASH), ("state_stored", h[0], ROOT_HASH)))
    with pytest.raises(InconsistentEvents, match="stored again"):
        index.apply("w", _events(("stored", h[0], ROOT_HASH)))
    with pytest.raises(InconsistentEvents, match="not held"):
        index.apply("w", _events(("state_evicted", h[2], h[1])))


def test_dropping_a_worker_keeps_what_others_hold():
    h = page_hashes(list(range(8)), PAGE)
    shared = [("stored", h[0], ROOT_HASH), ("stored", h[1], h[0]), ("state_stored", h[1], h[0])]
    index = CacheIndex()
    index.apply("a", _events(*shared))
    index.apply("b", _events(*shared, ("stored", h[2], h[1]), ("state_stored", h[2], h[1])))
    index.apply("c", _events(*shared))
    assert index.usable_pages(h) == {"a": 2, "b": 3, "c": 2}
    index.drop_worker("b")
    index.drop_worker("c")
    assert index.usable_pages(h) == {"a": 2}
    assert index.num_pages == 2 and index.num_page_entries == 2
    index.drop_worker("a")
    assert index.num_pages == 0 and index.usable_pages(h) == {}


# ---- the feed: losses, restarts, snapshots ---------------------------------------------------------------
deliveries = st.lists(
    st.tuples(st.integers(0, 2), sequences, st.one_of(st.none(), st.integers(0, 5)), st.sampled_from(
        ["deliver", "deliver", "deliver", "lose", "report", "snapshot", "stale_snapshot"]
    )),
    min_size=1, max_size=50,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries, st.booleans())
def test_feed_converges_to_the_workers_cache_whatever_is_lost(steps, start_late):
    """Batches lost in any pattern (trimmed streams, Redis restarted empty, a router that starts late), reports
    and snapshots (fresh or stale) in any order: once the stream is read to its end and snapshots are served,
    the index equals the worker's cache."""
    pod = PodCache()
    index = CacheIndex()
    feed = WorkerFeed("w", index)
    old_snapshots = [pod.snapshot()]
    skip = start_late
    now = 0.0
    for _, tokens, checkpoint_at, action in steps:
        pod.insert(tokens, checkpoint_at)
        batch = pod.batch()
        if batch is not None:
            if skip or action == "lose":
                skip = False
            else:
                feed.on_batch(batch)
        if action == "report":
            feed.on_report(pod.seq, pod.tree.digest)
        elif action == "stale_snapshot":
            feed.on_snapshot(random.Random(pod.seq).choice(old_snapshots))
        elif action == "snapshot" and feed.wants_snapshot(now):
            feed.requested(now)
            snapshot = pod.snapshot()
            old_snapshots.append(snapshot)
            feed.on_snapshot(snapshot)
        now += 0.5
    # Quiescence: the heartbeat names the last batch; snapshots are served until the feed is in step.
    feed.on_report(pod.seq, pod.tree.digest)
    for _ in range(3):
        if feed.in_sync:
            break
        feed.on_snapshot(pod.snapshot())
    assert feed.state is FeedState.FOLLOWING and feed.applied_seq == pod.seq
    assert index.digest("w") == pod.tree.digest
    holders = {h for h in index._page_holders}
    assert holders == {n.page_hash for n in pod.tree._nodes()}
    assert set(index._state_holders) == {n.page_hash for n in pod.tree._nodes() if n.state_slot is not None}


def test_feed_transitions_are_checked():
    feed = WorkerFeed("w", CacheIndex())
    with pytest.raises(RuntimeError, match="not allowed"):
        feed._move(FeedState.FOLLOWING)


def test_a_restarted_pod_is_a_new_worker_and_the_old_one_is_forgotten():
    index = CacheIndex()
    table = WorkerTable(index, model="m", hash_scheme="mix64-v1", page_size=PAGE, ttl_s=3.0)

    def record(instance: str, address: str, **load) -> WorkerRecord:
        return WorkerRecord(instance, "decode", address, "m", "fp", "mix64-v1", PAGE, 4, 4, 100, 50, 4, 0, "", 0.0,
                            **load)

    table.update([record("old", "10.0.0.1:1"), record("other", "10.0.0.2:1")], now=0.0)
    h = page_hashes(list(range(4)), PAGE)
    index.apply("old", _events(("stored", h[0], ROOT_HASH), ("state_stored", h[0], ROOT_HASH)))
    table.update([record("new", "10.0.0.1:1"), record("other", "10.0.0.2:1")], now=1.0)
    assert set(table.workers) == {"new", "other"} and index.usable_pages(h) == {}
    # Silence shorter than the TTL keeps a worker (Redis restarting, a slow heartbeat); longer drops it.
    table.update([record("new", "10.0.0.1:1")], now=3.5)
    assert "other" in table.workers
    table.update([record("new", "10.0.0.1:1")], now=4.5)
    assert set(table.workers) == {"new"}
    # Workers of another model or page size are not used.
    table.update([record("new", "10.0.0.1:1"), dataclass_replace(record("x", "10.0.0.3:1"), page_size=8)], now=5.0)
    assert set(table.workers) == {"new"} and "page size 8" in table.refused["x"]
    # Full (running + waiting at capacity: routers' in-flight requests plus those no router placed) is not
    # eligible; the pod's own running count lags, so it does not decide.
    table.update([record("new", "10.0.0.1:1", running=8, direct_requests=3)], now=6.0)
    assert [w.name for w in table.eligible("decode", now=6.0)] == ["new"]
    for _ in range(3):
        table.started(table.workers["new"])
    table.set_inflight_elsewhere({"new": 2})
    assert table.eligible("decode", now=6.0) == []
    table.ended(table.workers["new"])
    assert [w.name for w in table.eligible("decode", now=6.0)] == ["new"]
    table.failed(table.workers["new"], until=7.0)
    assert table.eligible("decode", now=6.5) == [] and len(table.eligible("decode", now=7.0)) == 1


def dataclass_replace(record, **changes):
    import dataclasses

    return dataclasses.replace(record, **changes)


# ---- placement ------------------------------------------------------------------------------------------
def test_cache_aware_trades_hit_against_load_and_ties_are_deterministic():
    placer = Placer(Policy.CACHE_AWARE, Weights(cache=1.0, queue=1.0, request=100.0))
    hot = Candidate("a", "a:1", active=3, queued_tokens=0, hit_tokens=1000)
    idle = Candidate("b", "b:1", active=0, queued_tokens=0, hit_tokens=0)
    choice = placer.choose([idle, hot], prompt_tokens=1200)
    assert choice.name == "a" and choice.reason == "cache_hit"  # 200 + 300 < 1200
    busier = Candidate("a", "a:1", active=12, queued_tokens=0, hit_tokens=1000)
    choice = placer.choose([idle, busier], prompt_tokens=1200)
    assert choice.name == "b" and choice.reason == "load"  # 200 + 1200 > 1200
    twins = [Candidate(n, n, 0, 0, 0) for n in ("z", "m", "c")]
    assert {placer.choose(twins, 10).name for _ in range(5)} == {"c"}
    assert Placer(Policy.CACHE_AWARE, Weights()).choose(list(reversed(twins)), 10).name == "c"


def test_session_policy_is_sticky_and_moves_only_the_lost_workers_sessions():
    placer = Placer(Policy.SESSION, Weights())
    workers = [Candidate(f"w{i}", f"10.0.0.{i}:5", 0, 0, 0) for i in range(5)]
    before = {s: placer.choose(workers, 10, session_id=f"s{s}").name for s in range(200)}
    assert len(set(before.values())) == 5
    assert all(placer.choose(workers, 10, session_id=f"s{s}").name == w for s, w in before.items())
    remaining = [w for w in workers if w.name != "w2"]
    after = {s: placer.choose(remaining, 10, session_id=f"s{s}").name for s in range(200)}
    assert all(after[s] == w for s, w in before.items() if w != "w2")
    assert placer.choose(workers, 10).reason == "session_fallback"


def test_round_robin_and_least_load():
    workers = [Candidate(n, n, a, q, 0) for n, a, q in (("a", 2, 0), ("b", 1, 50), ("c", 1, 10))]
    rr = Placer(Policy.ROUND_ROBIN, Weights())
    assert [rr.choose(workers, 10).name for _ in range(4)] == ["a", "b", "c", "a"]
    assert Placer(Policy.LEAST_LOAD, Weights()).choose(workers, 10).name == "c"
