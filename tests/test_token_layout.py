"""A step's token positions and KV slots (``model_runner.token_positions_and_slots``, vectorised with numpy so a
32K-token prompt is laid out in about a millisecond) against the token-by-token rule they replace."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.model_runner import token_positions_and_slots


@st.composite
def steps(draw):
    """Sequences of a step: each its own page list (distinct page ids), a start and a number of new tokens."""
    page_size = draw(st.sampled_from([1, 4, 16, 64]))
    seqs = []
    next_page = 0
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, 300))
        length = draw(st.integers(1, 200))
        num_pages = -(-(start + length) // page_size)
        page_ids = draw(st.permutations(range(next_page, next_page + num_pages)))
        next_page += num_pages
        seqs.append((start, length, list(page_ids)))
    return page_size, seqs


@settings(max_examples=300, deadline=None)
@given(steps())
def test_positions_and_slots_equal_the_token_by_token_rule(step):
    page_size, seqs = step
    starts, lengths, pages, offsets = [], [], [], []
    want_positions, want_slots = [], []
    for start, length, page_ids in seqs:
        end = start + length
        # What the step passes: only the pages its new tokens touch, and where sequence i's run of them begins.
        starts.append(start)
        lengths.append(length)
        offsets.append(len(pages) - start // page_size)
        pages.extend(page_ids[start // page_size: -(-end // page_size)])
        want_positions.extend(range(start, end))
        want_slots.extend(page_ids[p // page_size] * page_size + p % page_size for p in range(start, end))
    positions, slots = token_positions_and_slots(starts, lengths, pages, offsets, page_size)
    assert positions.tolist() == want_positions
    assert slots.tolist() == want_slots
    assert len(set(want_slots)) == len(want_slots)  # distinct pages: no two tokens share a slot


def test_a_step_for_a_request_without_the_pages_it_needs_is_refused(tiny_checkpoint):
    """The numpy layout reads the pages of the whole step from one list, so a request short of pages would take
    the next sequence's: build_batch checks each sequence's pages first."""
    from services.engine.request import Request, SamplingParams
    from services.engine.scheduler import ScheduledSeq
    from tests.helpers import cpu_engine

    engine = cpu_engine(tiny_checkpoint)
    page_size = engine.runner.page_size
    short = Request("short", list(range(3 * page_size)), SamplingParams())
    full = Request("full", list(range(2 * page_size)), SamplingParams())
    short.page_ids = engine.pages.allocate(2)  # three pages' worth of tokens
    full.page_ids = engine.pages.allocate(2)
    short.state_slot, full.state_slot = engine.slots.allocate_one(), engine.slots.allocate_one()
    seqs = [ScheduledSeq(short, 3 * page_size, start=0), ScheduledSeq(full, 2 * page_size, start=0)]
    with pytest.raises(RuntimeError, match="short has 2 pages, too few for tokens \\[0, 12\\)"):
        engine.runner.build_batch(seqs)
    short.page_ids.extend(engine.pages.allocate(1))
    batch = engine.runner.build_batch(seqs)
    assert batch.kv_slot_ids.tolist()[-2 * page_size:] == [p * page_size + o for p in full.page_ids
                                                          for o in range(page_size)]
