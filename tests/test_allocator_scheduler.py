"""Property-based tests of the id pools and the scheduler's bookkeeping (no model, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.engine.allocator import IdPool, OutOfIdsError
from services.engine.request import Request, SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig


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


TestIdPool = IdPoolMachine.TestCase
TestIdPool.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps (which 'compute' what was scheduled and sometimes emit a token), finishes and
    aborts. Invariants: budgets hold, page/slot accounting is exact, every running request's pages cover
    its computed tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24, prefill_chunk_size=10, page_size=4)
        self.pages = IdPool(30, "pages")
        self.slots = IdPool(4, "slots")
        self.scheduler = Scheduler(self.config, self.pages, self.slots)
        self.live: list[Request] = []
        self.counter = 0

    @rule(prompt_len=st.integers(1, 60), max_tokens=st.integers(1, 40))
    def arrive(self, prompt_len, max_tokens):
        if prompt_len + max_tokens > 30 * 4:  # the engine refuses what could never fit
            return
        self.counter += 1
        request = Request(f"r{self.counter}", [1] * prompt_len, SamplingParams(max_tokens=max_tokens))
        self.scheduler.add(request)
        self.live.append(request)

    @rule()
    def step(self):
        batch = self.scheduler.schedule()
        assert sum(s.num_new_tokens for s in batch) <= self.config.max_num_batched_tokens
        assert len({id(s.request) for s in batch}) == len(batch)
        for seq in batch:
            request = seq.request
            assert request.state_slot is not None
            end = request.num_computed_tokens + seq.num_new_tokens
            assert len(request.page_ids) * self.config.page_size >= end
            samples = seq.samples
            request.num_computed_tokens = end
            if samples:
                request.output_token_ids.append(2)
                if len(request.output_token_ids) >= request.params.max_tokens:
                    self.scheduler.remove(request)
                    self.live.remove(request)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        request = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.scheduler.remove(request)

    @invariant()
    def accounting(self):
        running, waiting = self.scheduler.running, self.scheduler.waiting
        assert len(running) <= self.config.max_num_seqs
        assert {id(r) for r in running} | {id(r) for r in waiting} == {id(r) for r in self.live}
        pages = [p for r in self.live for p in r.page_ids]
        assert len(pages) == len(set(pages)) == self.pages.num_used
        assert sum(r.state_slot is not None for r in self.live) == self.slots.num_used
        for r in waiting:
            assert r.state_slot is None and not r.page_ids and r.num_computed_tokens == 0
        for r in running:
            assert len(r.page_ids) * self.config.page_size >= r.num_computed_tokens

    def teardown(self):
        # Everything still live finishes: all memory must come back.
        for request in list(self.live):
            self.scheduler.remove(request)
        assert self.pages.num_used == 0 and self.slots.num_used == 0


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_scheduler_makes_progress_until_everything_finishes():
    """Liveness: with memory for only some requests at a time, every request still completes."""
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16, prefill_chunk_size=8, page_size=4)
    pages, slots = IdPool(12, "pages"), IdPool(3, "slots")
    scheduler = Scheduler(config, pages, slots)
    requests = [Request(f"r{i}", [1] * (10 + 6 * i), SamplingParams(max_tokens=12)) for i in range(5)]
    for r in requests:
        scheduler.add(r)
    for _ in range(2000):
        if not scheduler.has_work():
            break
        for seq in scheduler.schedule():
            request = seq.request
            samples = seq.samples
            request.num_computed_tokens += seq.num_new_tokens
            if samples:
                request.output_token_ids.append(2)
                if len(request.output_token_ids) >= 12:
                    scheduler.remove(request)
    assert not scheduler.has_work()
    assert all(len(r.output_token_ids) == 12 for r in requests)
    assert any(r.num_preemptions for r in requests)
    assert pages.num_used == 0 and slots.num_used == 0
