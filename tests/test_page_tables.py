"""The host page-table mirror used by CUDA-graph decode steps: always equal to the request's page list."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.page_tables import PageTableMirror

# An operation: ("grow", pages to append) | ("replace", new list length) | ("forget", 0); each is followed by a
# lookup of a random prefix length.
_ops = st.lists(
    st.tuples(st.sampled_from(["grow", "grow", "grow", "replace", "forget"]), st.integers(0, 40), st.floats(0, 1)),
    min_size=1, max_size=60,
)


@given(_ops)
@settings(max_examples=200, deadline=None)
def test_mirror_matches_page_list(ops):
    mirror = PageTableMirror()
    page_ids: list[int] = []
    next_page = 0
    for op, amount, fraction in ops:
        if op == "grow":  # the scheduler extends the running request's list in place
            page_ids.extend(range(next_page, next_page + amount))
            next_page += amount
        elif op == "replace":  # admission / preemption / release assign a new list
            page_ids = [next_page + 1000 + i for i in range(amount)]
            next_page += amount
        else:
            mirror.forget("req")
        num_pages = int(fraction * len(page_ids))
        pages = mirror.pages("req", page_ids, num_pages)
        assert pages.dtype == torch.int32
        assert pages.tolist() == page_ids[:num_pages]


def test_forget_drops_the_request():
    mirror = PageTableMirror()
    mirror.pages("a", [1, 2, 3], 3)
    mirror.pages("b", [4], 1)
    mirror.forget("a")
    assert len(mirror) == 1
    assert mirror.pages("a", [7, 8], 2).tolist() == [7, 8]
