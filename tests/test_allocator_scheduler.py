"""Property-based tests of the id pools and the scheduler's bookkeeping (no model, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.engine.allocator import IdPool, OutOfIdsError
from services.engine.request import Request, SamplingParams
from tests.helpers import SchedulerDriver, logic_scheduler


class IdPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = IdPool(20, "test")
        self.held: list[list[int]] = []

    @rule(count=st.integers(0, 25))
    def allocate(self, count):
        free_before = self.pool.num_free
        if count > free_before:
            with pytest.raises(OutOfIdsError):
                self.pool.allocate(count)
            assert self.pool.num_free == free_before, "failed allocation must take nothing"
        else:
            self.held.append(self.pool.allocate(count))

    @rule(count=st.integers(0, 25), data=st.data())
    def allocate_runs(self, count, data):
        """Ids in runs of consecutive ids: the same accounting, and as few runs as the free ids allow."""
        free_before = self.pool.num_free
        if count > free_before:
            with pytest.raises(OutOfIdsError):
                self.pool.allocate_runs(count)
            assert self.pool.num_free == free_before
            return
        free = [i for i in range(self.pool.capacity) if self.pool.is_free(i)]
        longest = max((len(run) for run in _runs(free)), default=0)
        after = data.draw(st.one_of(st.none(), st.sampled_from(free))) if free else None
        ids = self.pool.allocate_runs(count, after=after)
        assert len(ids) == count
        runs = _runs(ids)
        assert all(run == sorted(run) for run in runs)
        if count and longest >= count and (after is None or not self._continues(after, ids)):
            assert len(runs) == 1, "a free run large enough exists: take it whole"
        if after is not None and after + 1 in free and count:
            assert ids[0] == after + 1, "continue the run ending at ``after``"
        self.held.append(ids)

    @staticmethod
    def _continues(after, ids):
        return ids[0] == after + 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        ids = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.free(ids)

    @precondition(lambda self: any(self.held))
    @rule()
    def double_free_is_refused(self):
        ids = next(h for h in self.held if h)
        with pytest.raises(ValueError, match="freed twice"):
            self.pool.free([ids[0], ids[0]])
        # the first free in that call went through; hand the rest back to keep the model in sync
        self.held.remove(ids)
        self.pool.free(ids[1:])

    @invariant()
    def accounting(self):
        held = [i for h in self.held for i in h]
        assert len(held) == len(set(held)), "an id was handed out twice"
        assert self.pool.num_free + len(held) == self.pool.capacity
        assert all(not self.pool.is_free(i) for i in held)


def _runs(ids: list[int]) -> list[list[int]]:
    """Maximal pieces of consecutive ascending ids, in order."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


TestIdPool = IdPoolMachine.TestCase
TestIdPool.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals (prompts sharing prefixes, so the cache hits), steps, finishes and aborts.
    Invariants: budgets hold; every page and slot is accounted for exactly once (free, private to a
    request, or cached in the tree); running requests' pages cover their computed tokens; locks balance."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler = logic_scheduler(max_seqs=4, budget=24, chunk=10, num_pages=30)
        self.live: list[Request] = []
        self.counter = 0
        self.driver = SchedulerDriver(self.scheduler, self.live.remove, overlap=True)

    @rule(prefix=st.sampled_from([0, 1, 2]), prefix_len=st.integers(0, 40), suffix_len=st.integers(1, 30),
          max_tokens=st.integers(1, 30))
    def arrive(self, prefix, prefix_len, suffix_len, max_tokens):
        if prefix_len + suffix_len + max_tokens > 30 * 4:  # the engine refuses what could never fit
            return
        self.counter += 1
        prompt = [prefix] * prefix_len + [100 + self.counter] * suffix_len
        request = Request(f"r{self.counter}", prompt, SamplingParams(max_tokens=max_tokens))
        self.scheduler.add(request)
        self.live.append(request)

    @rule()
    def step(self):
        batch = self.driver.step()
        assert sum(s.num_new_tokens for s in batch) <= self.scheduler.config.max_num_batched_tokens
        assert len({id(s.request) for s in batch}) == len(batch)

    @rule(repeats=st.integers(1, 8))
    def decode_alone(self, repeats):
        """Steps with nothing new arriving, so the overlapped decode path runs step after step."""
        for _ in range(repeats):
            if not self.scheduler.has_work():
                break
            self.step()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        request = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.scheduler.abort(request)

    @rule()
    def evict_everything_unlocked(self):
        self.scheduler.cache.evict_pages(1000)

    @invariant()
    def accounting(self):
        sched = self.scheduler
        tree = sched.cache.tree
        tree.check_integrity()
        running, waiting = sched.running, sched.waiting
        assert len(running) <= sched.config.max_num_seqs
        assert {id(r) for r in running} | {id(r) for r in waiting} == {id(r) for r in self.live}
        private = [p for r in self.live for p in r.page_ids if not tree.owns_page(p)]
        assert len(private) == len(set(private))
        assert len(private) + tree.num_cached_pages == sched.pages.num_used
        snapshots = [r.snapshot_slot for r in self.live if r.snapshot_slot is not None]
        assert len(snapshots) + tree.num_cached_states == sched.cache.checkpoint_slots.num_used
        assert sum(r.state_slot is not None for r in self.live) == sched.slots.num_used
        for r in waiting:
            assert r.state_slot is None and not r.page_ids and r.cache_node is None
        for r in running:
            assert len(r.page_ids) * sched.config.page_size >= r.num_computed_tokens
        locks = {}
        for r in running:
            node = r.cache_node
            while node is not None and node is not tree.root:
                locks[id(node)] = locks.get(id(node), 0) + 1
                node = node.parent
        for node in tree._nodes():
            assert node.lock_ref == locks.get(id(node), 0), "locks must match the running requests' paths"

    def teardown(self):
        self.driver.in_flight = None
        for request in list(self.live):
            self.scheduler.finish(request)
        self.scheduler.cache.flush()
        assert self.scheduler.pages.num_used == 0 and self.scheduler.slots.num_used == 0
        assert self.scheduler.cache.checkpoint_slots.num_used == 0


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=80, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("enabled", [True, False])
def test_scheduler_makes_progress_until_everything_finishes(enabled, overlap):
    """Liveness: with memory for only some requests at a time, every request still completes."""
    scheduler = logic_scheduler(max_seqs=3, budget=16, chunk=8, num_pages=12, enabled=enabled)
    requests = [Request(f"r{i}", [1] * (10 + 6 * i), SamplingParams(max_tokens=12)) for i in range(5)]
    for r in requests:
        scheduler.add(r)
    driver = SchedulerDriver(scheduler, lambda r: None, overlap)
    for _ in range(2000):
        if not scheduler.has_work():
            break
        driver.step()
    assert not scheduler.has_work()
    assert (driver.steps_ahead > 0) == overlap
    assert all(len(r.output_token_ids) == 12 for r in requests)
    assert any(r.num_preemptions for r in requests)
    scheduler.cache.flush()
    assert scheduler.pages.num_used == 0 and scheduler.slots.num_used == 0
