"""The chained page hash shared by pods and routers: the numpy version equals a plain-Python reference of
the formula, resumes from any parent, and tells apart what a prefix cache must tell apart."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.page_hash import ROOT_HASH, extend_page_hashes, mix, page_hash, page_hashes, unmix

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def reference_hashes(tokens: list[int], page_size: int) -> list[int]:
    """The formula of services/common/page_hash.py, one Python int at a time."""
    keys = [mix(j + 1) | 1 for j in range(page_size)]
    hashes, total = [], 0
    for depth in range(1, len(tokens) // page_size + 1):
        page = tokens[(depth - 1) * page_size : depth * page_size]
        content = sum(mix(((t + 1) * k) & MASK) for t, k in zip(page, keys, strict=True)) & MASK
        total = (total + mix(content ^ ((depth * GOLDEN) & MASK))) & MASK
        hashes.append(mix(total))
    return hashes


token_lists = st.lists(st.integers(0, 2**31 - 1), max_size=80)


@given(st.integers(0, 2**64 - 1))
def test_unmix_inverts_mix(x):
    assert unmix(mix(x)) == x and mix(unmix(x)) == x


@given(token_lists, st.sampled_from([1, 2, 4, 16]))
def test_vectorised_equals_reference(tokens, page_size):
    assert page_hashes(tokens, page_size) == reference_hashes(tokens, page_size)


@given(token_lists, st.integers(0, 20), st.sampled_from([2, 4]))
def test_chain_resumes_from_any_parent(tokens, split_page, page_size):
    whole = page_hashes(tokens, page_size)
    split_page = min(split_page, len(whole))
    head = page_hashes(tokens[: split_page * page_size], page_size)
    parent = head[-1] if head else ROOT_HASH
    tail = page_hashes(tokens[split_page * page_size :], page_size, parent=parent, depth=split_page)
    assert head + tail == whole
    assert extend_page_hashes(list(head), tokens, page_size) == whole
    for depth, h in enumerate(whole, start=1):
        parent = whole[depth - 2] if depth > 1 else ROOT_HASH
        assert page_hash(parent, tokens[(depth - 1) * page_size : depth * page_size], depth) == h


def test_order_within_and_between_pages_matters():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    assert page_hashes(a + b, 4) != page_hashes(b + a, 4)[::-1]
    assert page_hashes(a, 4) != page_hashes([2, 1, 3, 4], 4)
    # The same page content at another depth, after another parent, is another key.
    assert page_hashes(a + a, 4)[1] != page_hashes(a, 4)[0]
    assert page_hashes(b + a, 4)[1] != page_hashes(a + a, 4)[1]
    assert ROOT_HASH not in page_hashes([0] * 64, 4)
