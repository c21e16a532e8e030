"""Property-based tests of the radix tree alone (no model, no torch): random inserts, matches, locks,
unlocks, checkpoint attaches and evictions keep the invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.common.page_hash import ROOT_HASH, extend_page_hashes, page_hash
from services.engine.allocator import IdPool
from services.engine.radix_cache import RadixCache

PAGE = 2
# A small alphabet of page contents so that random sequences share prefixes often.
tokens_strategy = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=7).map(
    lambda pages: [t for p in pages for t in (p, p + 10)]
)


class _User:
    """A stand-in for a request: private pages it computed, and the tree node it holds locked."""

    def __init__(self, tokens, pages_ids, node):
        self.tokens = tokens
        self.page_ids = pages_ids
        self.node = node


class TreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pages = IdPool(24, "pages")
        self.slots = IdPool(5, "checkpoints", first_id=100)
        self.tree = RadixCache(PAGE, self.pages, self.slots)
        self.users: list[_User] = []
        self.locked_pages_snapshot: set[int] = set()

    def _locked_pages(self) -> set[int]:
        return {n.page_id for n in self.tree._nodes() if n.lock_ref > 0}

    @rule(tokens=tokens_strategy)
    def match_then_use(self, tokens):
        """A request matches, locks what it got, then allocates private pages for the rest."""
        hashes = extend_page_hashes([], tokens, PAGE)
        result = self.tree.match(tokens, hashes, max_pages=len(hashes))
        assert result.node.depth == len(result.page_ids) <= result.num_kv_pages <= len(hashes)
        if result.state_slot is not None:
            assert result.node.state_slot == result.state_slot
        for depth, page_id in enumerate(result.page_ids, start=1):
            node = self.tree._page_owner[page_id]
            assert node.depth == depth and node.tokens == tuple(tokens[(depth - 1) * PAGE : depth * PAGE])
        needed = len(hashes) - len(result.page_ids)
        self.tree.lock(result.node)  # before any eviction, as the engine does: what it matched stays
        if not self.pages.can_allocate(needed):
            self.tree.evict_pages(needed - self.pages.num_free)
        if not self.pages.can_allocate(needed):
            self.tree.unlock(result.node)
            return
        assert all(self.tree.owns_page(p) for p in result.page_ids)
        self.users.append(_User(tokens, result.page_ids + self.pages.allocate(needed), result.node))

    @precondition(lambda self: self.users)
    @rule(data=st.data(), checkpoint=st.booleans())
    def finish(self, data, checkpoint):
        """A request ends: its pages join the tree, maybe with a checkpoint at the end, its lock goes."""
        user = self.users.pop(data.draw(st.integers(0, len(self.users) - 1)))
        hashes = extend_page_hashes([], user.tokens, PAGE)
        node = self.tree.insert(user.tokens, hashes, user.page_ids)
        assert node.depth == len(user.page_ids)
        if checkpoint and (self.slots.can_allocate(1) or self.tree.evict_states(1)):
            slot = self.slots.allocate_one()
            if not self.tree.attach_state(node, slot):
                self.slots.free([slot])
        self.tree.unlock(user.node)
        self.pages.free([p for p in user.page_ids if not self.tree.owns_page(p)])

    @rule(count=st.integers(1, 30))
    def evict_pages(self, count):
        locked = self._locked_pages()
        before = self.pages.num_free
        freed = self.tree.evict_pages(count)
        assert self.pages.num_free == before + freed
        assert locked <= {n.page_id for n in self.tree._nodes()}, "a locked page was evicted"

    @rule(data=st.data())
    def supersede(self, data):
        holders = [n for n in self.tree._nodes() if n.state_slot is not None]
        if holders:
            self.tree.supersede(data.draw(st.sampled_from(holders)))

    @rule(count=st.integers(1, 5))
    def evict_states(self, count):
        before = self.tree.num_cached_states
        freed = self.tree.evict_states(count)
        assert self.tree.num_cached_states == before - freed

    @invariant()
    def invariants(self):
        self.tree.check_integrity()
        private = [p for u in self.users for p in u.page_ids if not self.tree.owns_page(p)]
        # free + cached + in use == total, for pages and for checkpoint slots
        assert self.pages.num_free + self.tree.num_cached_pages + len(private) == self.pages.capacity
        assert self.slots.num_free + self.tree.num_cached_states == self.slots.capacity
        for node in self.tree._nodes():
            ancestor = node.parent
            while ancestor is not self.tree.root:  # a node (and its state) implies all ancestor pages
                assert self.tree.owns_page(ancestor.page_id)
                ancestor = ancestor.parent
        expected_locks: dict[int, int] = {}
        for user in self.users:
            node = user.node
            while node is not self.tree.root:
                expected_locks[id(node)] = expected_locks.get(id(node), 0) + 1
                node = node.parent
        for node in self.tree._nodes():
            assert node.lock_ref == expected_locks.get(id(node), 0)

    def teardown(self):
        for user in self.users:
            self.tree.unlock(user.node)
            self.pages.free([p for p in user.page_ids if not self.tree.owns_page(p)])
        self.tree.evict_states(100)
        self.tree.evict_pages(100)
        assert self.pages.num_free == self.pages.capacity and self.slots.num_free == self.slots.capacity
        assert self.tree.num_cached_pages == 0


TestTree = TreeMachine.TestCase
TestTree.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def _tree(num_pages=16, num_slots=4):
    pages, slots = IdPool(num_pages, "pages"), IdPool(num_slots, "checkpoints", first_id=50)
    return RadixCache(PAGE, pages, slots), pages, slots


def _insert(tree, pages, tokens, checkpoint_slots=None, at_depth=None):
    hashes = extend_page_hashes([], tokens, PAGE)
    ids = pages.allocate(len(hashes))
    node = tree.insert(tokens, hashes, ids)
    pages.free([p for p in ids if not tree.owns_page(p)])
    if checkpoint_slots is not None:
        target = tree.node_at(tokens, hashes, at_depth or len(hashes))
        assert tree.attach_state(target, checkpoint_slots.allocate_one())
    return node, hashes


def test_match_stops_at_the_deepest_checkpoint_not_the_deepest_kv():
    tree, pages, slots = _tree()
    tokens = [1, 11, 2, 12, 3, 13, 4, 14]
    _, hashes = _insert(tree, pages, tokens, slots, at_depth=2)
    result = tree.match(tokens, hashes, max_pages=4)
    assert result.num_kv_pages == 4 and result.node.depth == 2 and len(result.page_ids) == 2
    assert result.state_slot == result.node.state_slot
    # The caller's limit (always leave a token to compute) is respected too.
    assert tree.match(tokens, hashes, max_pages=1).node is tree.root


def test_tokens_are_rechecked_on_hash_match():
    tree, pages, _ = _tree()
    tokens = [1, 11, 2, 12]
    _, hashes = _insert(tree, pages, tokens)
    forged = [1, 11, 9, 9]  # pretend its second page hashed like the cached one
    result = tree.match(forged, hashes, max_pages=2)
    assert result.num_kv_pages == 1


def test_leaves_without_checkpoints_are_evicted_first_then_lru():
    tree, pages, slots = _tree()
    _insert(tree, pages, [1, 11, 2, 12], slots)  # branch A: checkpoint at its leaf
    _insert(tree, pages, [1, 11, 3, 13])  # branch B: no checkpoint
    tree.evict_pages(1)
    kept = {n.tokens for n in tree._nodes()}
    assert (2, 12) in kept and (3, 13) not in kept


def test_state_goes_with_its_page_and_events_describe_everything():
    tree, pages, slots = _tree()
    tokens = [5, 15, 6, 16]
    node, hashes = _insert(tree, pages, tokens, slots)
    h1 = page_hash(ROOT_HASH, [5, 15], depth=1)
    assert hashes == [h1, page_hash(h1, [6, 16], depth=2)]
    events = list(tree.events)
    assert events[0] == ("stored", h1, ROOT_HASH, False)
    assert events[1] == ("stored", hashes[1], h1, False)
    assert events[2] == ("state_stored", hashes[1], h1, True)
    tree.events.clear()
    tree.evict_pages(1)
    assert list(tree.events) == [("state_evicted", hashes[1], h1, False), ("evicted", hashes[1], h1, False)]
    assert slots.num_used == 0, "the checkpoint was freed with its page"


def test_locked_paths_are_never_evicted():
    tree, pages, _ = _tree()
    node, _ = _insert(tree, pages, [1, 11, 2, 12, 3, 13])
    tree.lock(node)
    assert tree.evict_pages(10) == 0
    tree.unlock(node)
    assert tree.evict_pages(10) == 3
    with pytest.raises(ValueError, match="not locked"):
        tree.unlock(node)


def test_superseded_checkpoints_go_first_and_use_clears_the_mark():
    tree, pages, slots = _tree()
    shallow_tokens = [1, 11, 2, 12]
    deep_tokens = shallow_tokens + [3, 13]
    _insert(tree, pages, deep_tokens, slots, at_depth=2)
    _, hashes = _insert(tree, pages, deep_tokens, slots, at_depth=3)
    shallow = tree.node_at(deep_tokens, hashes, 2)
    other, _ = _insert(tree, pages, [7, 17], slots)  # older-used than nothing: the LRU choice otherwise
    tree.supersede(shallow)
    tree.evict_states(1)
    assert shallow.state_slot is None and other.state_slot is not None
    # A match that starts from a superseded checkpoint makes it valuable again.
    _insert(tree, pages, deep_tokens, slots, at_depth=2)
    tree.supersede(shallow)
    tree.match(shallow_tokens + [9], extend_page_hashes([], shallow_tokens + [9], PAGE), max_pages=2)
    assert not shallow.state_superseded
    tree.evict_states(1)
    assert shallow.state_slot is not None, "the least recently used non-superseded one went instead"
