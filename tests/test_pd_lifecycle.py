"""The prefill/decode request lifecycle as a state machine, driven through the scheduler (no model, no torch):
random arrivals, steps, prefill pods that answer, fail after confirming they stopped, or fail without a
word (quarantine), quarantine reclaimed, hand-overs held and released, and a cancel at every stage.

What must hold after every event: each request is in a state consistent with the queue it is in (and got
there only through ``Request.move_to``'s checked transitions, which raise otherwise); every page and slot is
in exactly one place (free, a request's, the cache's, quarantine); and memory a prefill pod may still write
is never free, never the cache's and never another request's, until that pod answered, confirmed it
stopped, or its quarantine was reclaimed.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.engine.request import (
    REMOTE_WRITABLE,
    IllegalTransitionError,
    Request,
    RequestStatus,
    SamplingParams,
)
from tests.helpers import SchedulerDriver, logic_scheduler

PAGE = 4
THRESHOLD = 12  # uncached prompts at least this long go to a prefill pod
NUM_PAGES = 48
MAX_SEQS = 4


class PDLifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.scheduler = logic_scheduler(max_seqs=MAX_SEQS, budget=24, chunk=10, num_pages=NUM_PAGES,
                                         checkpoints=4, remote_threshold=THRESHOLD)
        self.requests: list[Request] = []  # every request ever added
        self.counter = 0
        self.driver = SchedulerDriver(self.scheduler, lambda request: None, overlap=True)
        # Memory a prefill pod may still write: by request id while its call runs, by key once quarantined.
        self.writing: dict[str, dict[str, set[int]]] = {}
        self.quarantined: dict[str, dict[str, set[int]]] = {}
        self.num_remote_done = 0
        self.num_reclaimed = 0

    # ---- events -------------------------------------------------------------------------------------
    @rule(prefix=st.sampled_from([0, 1]), prefix_len=st.integers(0, 24), suffix_len=st.integers(1, 24),
          max_tokens=st.integers(1, 12), hold=st.booleans())
    def arrive(self, prefix, prefix_len, suffix_len, max_tokens, hold):
        """A client request (decode side), or with ``hold`` a prefill pod's request (one token, memory held
        for the hand-over)."""
        if prefix_len + suffix_len + max_tokens > NUM_PAGES * PAGE // 2:
            return
        self.counter += 1
        prompt = [prefix] * prefix_len + [100 + self.counter] * suffix_len
        params = SamplingParams(max_tokens=1 if hold else max_tokens)
        request = Request(f"r{self.counter}", prompt, params, hold_memory=hold)
        self.scheduler.add(request)
        self.requests.append(request)

    @rule(repeats=st.integers(1, 4))
    def step(self, repeats):
        for _ in range(repeats):
            self.driver.step()
            # What AsyncEngine does after a step: hand new remote prefills to prefill pods.
            for request in self.scheduler.remote_prefills:
                assert request.status == RequestStatus.REMOTE_PREFILL
                assert not request.hold_memory, "a prefill pod's own requests never go remote"
                self.writing[request.request_id] = self._destinations(request)
            self.scheduler.remote_prefills.clear()

    def _destinations(self, request: Request) -> dict[str, set[int]]:
        """What the prefill pod is told to write: the pages past what the cache holds, and the slots."""
        pages = set(request.page_ids[request.num_computed_tokens // PAGE :])
        assert not any(self.scheduler.cache.tree.owns_page(p) for p in pages)
        checkpoints = {request.snapshot_slot} if request.snapshot_slot is not None else set()
        return {"pages": pages, "slots": {request.state_slot}, "checkpoints": checkpoints}

    def _pick(self, data, statuses) -> Request | None:
        candidates = [r for r in self.requests if r.status in statuses]
        return data.draw(st.sampled_from(candidates)) if candidates else None

    @rule(data=st.data(), checkpoint_written=st.booleans())
    def prefill_pod_answers(self, data, checkpoint_written):
        request = self._pick(data, REMOTE_WRITABLE)
        if request is None:
            return
        was_aborting = request.status == RequestStatus.ABORTING
        self.scheduler.remote_prefill_done(request, checkpoint_written)
        del self.writing[request.request_id]
        self.num_remote_done += 1
        assert request.status == (RequestStatus.FINISHED if was_aborting else RequestStatus.RUNNING)
        assert request.num_computed_tokens == request.num_tokens
        if not was_aborting:  # what Engine.complete_remote_prefill does next: the first token
            request.output_token_ids.append(7)
            if len(request.output_token_ids) >= request.params.max_tokens:
                self.scheduler.finish(request)

    @rule(data=st.data(), confirmed=st.booleans(), prefill_locally=st.booleans())
    def prefill_pod_fails(self, data, confirmed, prefill_locally):
        """It failed; ``confirmed``: it said it writes nothing more. Otherwise the memory is quarantined."""
        request = self._pick(data, REMOTE_WRITABLE)
        if request is None:
            return
        was_aborting = request.status == RequestStatus.ABORTING
        destinations = self.writing.pop(request.request_id)
        key = None if confirmed else f"call-{request.request_id}-{len(self.quarantined) + self.num_reclaimed}"
        self.scheduler.remote_prefill_failed(request, key, prefill_locally)
        if key is not None:
            self.quarantined[key] = destinations
        assert request.status == (RequestStatus.FINISHED if was_aborting else RequestStatus.WAITING)
        assert not request.page_ids and request.state_slot is None and request.snapshot_slot is None
        if not was_aborting:
            assert self.scheduler.waiting[0] is request, "a failed remote prefill goes first in line"

    @precondition(lambda self: self.quarantined)
    @rule(data=st.data())
    def quarantine_reclaimed(self, data):
        """The pod confirmed it stopped, or restarted."""
        key = data.draw(st.sampled_from(sorted(self.quarantined)))
        memory = self.scheduler.reclaim(key)
        assert memory is not None and set(memory.pages) == self.quarantined.pop(key)["pages"]
        assert self.scheduler.reclaim(key) is None, "reclaimed twice"
        self.num_reclaimed += 1

    @rule(data=st.data())
    def hand_over_done(self, data):
        request = self._pick(data, {RequestStatus.HANDING_OVER})
        if request is not None:
            self.scheduler.release_held(request)
            assert request.status == RequestStatus.FINISHED

    @rule(data=st.data())
    def cancel(self, data):
        """The client leaves (or a decode pod aborts a prefill pod's request), at whatever stage."""
        request = self._pick(data, set(RequestStatus) - {RequestStatus.FINISHED})
        if request is None:
            return
        before = request.status
        freed = self.scheduler.abort(request)
        if before in REMOTE_WRITABLE:
            assert not freed and request.status == RequestStatus.ABORTING, "a pod may still write its memory"
        else:
            assert freed and request.status == RequestStatus.FINISHED

    @rule(data=st.data())
    def illegal_transitions_are_refused(self, data):
        request = self._pick(data, {RequestStatus.FINISHED, RequestStatus.ABORTING, RequestStatus.HANDING_OVER})
        if request is None:
            return
        with pytest.raises(IllegalTransitionError):
            request.move_to(RequestStatus.RUNNING)

    @rule()
    def evict_everything_unlocked(self):
        self.scheduler.cache.evict_pages(1000)

    # ---- invariants ---------------------------------------------------------------------------------
    @invariant()
    def states_match_queues(self):
        sched = self.scheduler
        assert all(r.status == RequestStatus.WAITING for r in sched.waiting)
        assert all(r.status == RequestStatus.RUNNING for r in sched.running)
        assert all(r.status in REMOTE_WRITABLE for r in sched.remote)
        queued = {id(r) for r in [*sched.waiting, *sched.running, *sched.remote]}
        for r in self.requests:
            in_queue = r.status in (RequestStatus.WAITING, RequestStatus.RUNNING, *REMOTE_WRITABLE)
            assert (id(r) in queued) == in_queue, r.status
        assert len(sched.running) + len(sched.remote) <= MAX_SEQS
        assert {r.request_id for r in sched.remote} == set(self.writing) | {
            r.request_id for r in sched.remote_prefills
        }

    @invariant()
    def every_id_in_exactly_one_place(self):
        sched = self.scheduler
        tree, quarantine = sched.cache.tree, sched.quarantine
        tree.check_integrity()
        holders = [r for r in self.requests if r.status != RequestStatus.FINISHED]
        for r in self.requests:
            if r.status in (RequestStatus.FINISHED, RequestStatus.WAITING):
                assert not r.page_ids and r.state_slot is None and r.snapshot_slot is None, r.status
        private = [p for r in holders for p in r.page_ids if not tree.owns_page(p)]
        quarantined_pages = [p for m in quarantine.entries() for p in m.pages]
        assert len(set(private + quarantined_pages)) == len(private) + len(quarantined_pages)
        assert len(private) + len(quarantined_pages) + tree.num_cached_pages == sched.pages.num_used
        working = [r.state_slot for r in holders if r.state_slot is not None]
        working += [s for m in quarantine.entries() for s in m.working_slots]
        assert len(set(working)) == len(working) == sched.slots.num_used
        snapshots = [r.snapshot_slot for r in holders if r.snapshot_slot is not None]
        snapshots += [s for m in quarantine.entries() for s in m.checkpoint_slots]
        assert len(set(snapshots)) == len(snapshots)
        assert len(snapshots) + tree.num_cached_states == sched.cache.checkpoint_slots.num_used

    @invariant()
    def memory_a_pod_may_write_is_nobody_elses(self):
        sched = self.scheduler
        tree = sched.cache.tree
        owners = {r.request_id: r for r in sched.remote}
        attached = {n.state_slot for n in tree._nodes() if n.state_slot is not None}
        for origin, memory in [*self.writing.items(), *self.quarantined.items()]:
            owner = owners.get(origin)  # None once quarantined: then nobody may hold it
            for page in memory["pages"]:
                assert not sched.pages.is_free(page) and not tree.owns_page(page), page
                holders = [r for r in self.requests if page in r.page_ids]
                assert holders == ([owner] if owner else []), (page, holders)
            for slot in memory["slots"]:
                assert not sched.slots.is_free(slot)
                assert [r for r in self.requests if r.state_slot == slot] == ([owner] if owner else [])
            for slot in memory["checkpoints"]:
                assert not sched.cache.checkpoint_slots.is_free(slot) and slot not in attached
                assert [r for r in self.requests if r.snapshot_slot == slot] == ([owner] if owner else [])

    def teardown(self):
        """Settle everything and drain: all memory must come back."""
        sched = self.scheduler
        self.driver.in_flight = None
        for request in list(sched.remote):
            sched.remote_prefill_failed(request, None, prefill_locally=True)
        for key in list(self.quarantined):
            sched.reclaim(key)
        for request in self.requests:
            if request.status != RequestStatus.FINISHED:
                sched.abort(request)
        sched.cache.flush()
        assert sched.pages.num_used == 0 and sched.slots.num_used == 0
        assert sched.cache.checkpoint_slots.num_used == 0
        assert not sched.has_work()


TestPDLifecycle = PDLifecycleMachine.TestCase
TestPDLifecycle.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def test_remote_prefill_reuses_held_kv_and_publishes_the_resume_checkpoint():
    """The same prompt twice through a decode pod's scheduler: the first time a prefill pod computes it and
    writes the state at its resume boundary; the second time it starts there, here, with nothing sent."""
    sched = logic_scheduler(max_seqs=4, budget=64, chunk=64, num_pages=64, checkpoints=4, remote_threshold=12)
    prompt = list(range(1, 31))  # 30 tokens: resume boundary 28
    first = Request("a", prompt, SamplingParams(max_tokens=2))
    sched.add(first)
    assert sched.schedule() == [] and sched.remote_prefills == [first]
    assert first.snapshot_position == 28 and first.snapshot_slot is not None
    sched.remote_prefill_done(first, checkpoint_written=True)
    first.output_token_ids.append(5)
    [seq] = sched.schedule()  # decodes here
    sched.commit(seq)
    first.output_token_ids.append(6)
    sched.finish(first)

    again = Request("b", prompt, SamplingParams(max_tokens=2))
    sched.add(again)
    [seq] = sched.schedule()
    assert again.status == RequestStatus.RUNNING and again.num_cached_tokens == 28
    assert seq.num_new_tokens == 2 and seq.copy_state_from is not None
    sched.commit(seq)
    sched.finish(again)

    # A branch from inside the prompt: its KV is held (no checkpoint there), so the prefill pod is told to
    # send only the pages past it.
    branch = Request("c", prompt[:20] + list(range(200, 215)), SamplingParams(max_tokens=2))
    sched.add(branch)
    sched.remote_prefills.clear()
    assert sched.schedule() == [] and sched.remote_prefills == [branch]
    assert branch.num_computed_tokens == 20 and branch.num_cached_tokens == 20
    assert all(sched.cache.tree.owns_page(p) for p in branch.page_ids[:5])
    assert not any(sched.cache.tree.owns_page(p) for p in branch.page_ids[5:])
