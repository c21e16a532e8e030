"""The hybrid prefix cache's logic: a radix tree of KV pages whose nodes may own GDN state checkpoints.

Pure bookkeeping (ids, hashes, reference counts, recency); no tensors. One node per full page. A node's
key is the chained content hash of its page (``services/common/page_hash.py``: a function of the parent's
hash, the depth and the page's tokens), the same on every worker and in the router, and its tokens are
compared on every match so a hash collision can never return wrong KV.

A checkpoint (a state slot) on a node holds the GDN conv + SSM state after exactly the tokens up to the
end of that node's page. A prefix is usable only up to the deepest checkpoint on its path: a GDN state is
valid at one position only, so KV pages past the last checkpoint cannot be resumed from.

Eviction policy:
- Pages: unlocked leaves, least recently used first, but leaves without a checkpoint before those with
  one (nothing can ever start from below the deepest checkpoint, so such pages are the least useful). A
  node's checkpoint is freed with its page, never after it.
- Checkpoints: *superseded* ones first, then least recently used. A checkpoint is superseded once the
  request that started from it or published it publishes a deeper one on the same path: only a request
  diverging between the two could still use it, so for a conversation it is dead weight (the periodic
  checkpoints of a long prefill, last turn's checkpoint once this turn has its own). A request starting
  from a checkpoint clears the mark, which keeps a checkpoint shared by many conversations (the end of a
  system prompt) alive, while each live conversation's deepest checkpoint is never superseded.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from services.common.page_hash import ROOT_HASH, page_hash

from .allocator import IdPool

_MASK = (1 << 64) - 1


@dataclass(eq=False)
class Node:
    page_hash: int
    tokens: tuple[int, ...]
    page_id: int
    parent: Node | None
    depth: int  # pages from the root: this node's page covers tokens [(depth-1)*P, depth*P)
    children: dict[int, Node] = field(default_factory=dict)
    lock_ref: int = 0  # running requests whose path passes through this node
    last_access: int = 0
    state_slot: int | None = None
    state_last_used: int = 0
    state_superseded: bool = False

    @property
    def parent_hash(self) -> int:
        return self.parent.page_hash if self.parent is not None and self.parent.depth else ROOT_HASH


class CacheEvent(NamedTuple):
    """``stored``/``evicted`` for pages, ``state_stored``/``state_evicted`` for checkpoints."""

    kind: str
    page_hash: int
    parent_hash: int
    has_state: bool


class CacheDigest(NamedTuple):
    """What the tree holds, in four numbers: page and checkpoint counts, and the sums (mod 2**64) of their
    page hashes. A router's index of this cache, built from its events, must show the same four."""

    pages: int
    states: int
    page_sum: int
    state_sum: int


class MatchResult(NamedTuple):
    node: Node  # deepest matched node that holds a checkpoint (the root when none)
    page_ids: list[int]  # the pages from the root to ``node``
    state_slot: int | None  # the checkpoint at ``node`` to start from
    num_kv_pages: int  # pages whose KV matched, with or without a checkpoint (>= len(page_ids))
    kv_node: Node  # deepest matched node within ``max_pages``, checkpoint or not (KV a prefill pod need not send)
    kv_page_ids: list[int]  # the pages from the root to ``kv_node``


class RadixCache:
    def __init__(self, page_size: int, pages: IdPool, checkpoint_slots: IdPool, record_events: bool = True) -> None:
        """``record_events``: keep the stored/evicted events for someone to drain (a pod that publishes them
        to a router); without a consumer they are not kept, or the list would grow without bound."""
        self.page_size = page_size
        self.pages = pages
        self.checkpoint_slots = checkpoint_slots
        self.root = Node(ROOT_HASH, (), -1, None, 0)
        self._page_owner: dict[int, Node] = {}
        self._clock = itertools.count(1)
        self.record_events = record_events
        self.events: deque[CacheEvent] = deque()
        self._page_sum = 0
        self._state_sum = 0
        self.num_cached_states = 0
        self.num_evicted_pages = 0
        self.num_evicted_states = 0

    # ---- queries ------------------------------------------------------------------------------------
    @property
    def num_cached_pages(self) -> int:
        return len(self._page_owner)

    def owns_page(self, page_id: int) -> bool:
        return page_id in self._page_owner

    @property
    def digest(self) -> CacheDigest:
        return CacheDigest(len(self._page_owner), self.num_cached_states, self._page_sum, self._state_sum)

    def snapshot(self) -> list[CacheEvent]:
        """The events that rebuild this tree from empty: every page, parents before children, each followed by
        its checkpoint if it has one."""
        events, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            events.append(CacheEvent("stored", node.page_hash, node.parent_hash, False))
            if node.state_slot is not None:
                events.append(CacheEvent("state_stored", node.page_hash, node.parent_hash, True))
            stack.extend(node.children.values())
        return events

    def _emit(self, kind: str, node: Node) -> None:
        if self.record_events:
            self.events.append(CacheEvent(kind, node.page_hash, node.parent_hash, kind == "state_stored"))

    def match(self, token_ids: Sequence[int], hashes: Sequence[int], max_pages: int) -> MatchResult:
        """Longest cached path for ``token_ids`` (whose full-page hashes are ``hashes``) ending at a
        checkpoint, using at most ``max_pages`` pages. Refreshes the recency of what it returns."""
        node, best = self.root, self.root
        path: list[Node] = []
        for page, h in enumerate(hashes):
            child = node.children.get(h)
            tokens = token_ids[page * self.page_size : (page + 1) * self.page_size]
            if child is None or child.tokens != tuple(tokens):  # tokens re-checked: collisions never match
                break
            node = child
            path.append(node)
            if node.state_slot is not None and node.depth <= max_pages:
                best = node
        now = next(self._clock)
        for n in path[: best.depth]:
            n.last_access = now
        if best.state_slot is not None:
            best.state_last_used = now
            best.state_superseded = False
        kv_path = path[:max_pages]
        return MatchResult(
            best, [n.page_id for n in path[: best.depth]], best.state_slot, len(path),
            kv_path[-1] if kv_path else self.root, [n.page_id for n in kv_path],
        )

    def touch(self, node: Node) -> None:
        """Mark the path to ``node`` as just used (its pages are in use without a match through them)."""
        now = next(self._clock)
        while node is not self.root:
            node.last_access = now
            node = node.parent

    # ---- insertion ----------------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], hashes: Sequence[int], page_ids: Sequence[int]) -> Node:
        """Make the path of ``len(page_ids)`` full pages exist; returns its last node.

        Pages already in the tree keep the tree's page (the caller's copy stays the caller's, to free when
        done); the others are taken over by the tree.
        """
        node = self.root
        now = next(self._clock)
        for page, page_id in enumerate(page_ids):
            h = hashes[page]
            tokens = tuple(token_ids[page * self.page_size : (page + 1) * self.page_size])
            child = node.children.get(h)
            if child is not None and child.tokens != tokens:
                # A 64-bit hash collision: keep the existing entry, stop caching this path here.
                return node
            if child is None:
                if page_id in self._page_owner:
                    raise ValueError(f"page {page_id} is already cached at another position")
                child = Node(h, tokens, page_id, node, node.depth + 1)
                node.children[h] = child
                self._page_owner[page_id] = child
                self._page_sum = (self._page_sum + h) & _MASK
                self._emit("stored", child)
            child.last_access = now
            node = child
        return node

    def attach_state(self, node: Node, slot: int) -> bool:
        """Give ``node`` the checkpoint ``slot``; False (slot not taken) if it already has one."""
        if node is self.root:
            raise ValueError("the root holds no state")
        if node.state_slot is not None:
            return False
        node.state_slot = slot
        node.state_last_used = next(self._clock)
        node.state_superseded = False
        self.num_cached_states += 1
        self._state_sum = (self._state_sum + node.page_hash) & _MASK
        self._emit("state_stored", node)
        return True

    def supersede(self, node: Node) -> None:
        """A deeper checkpoint now exists on ``node``'s path: evict its checkpoint before the others."""
        if node.state_slot is not None:
            node.state_superseded = True

    def node_at(self, token_ids: Sequence[int], hashes: Sequence[int], num_pages: int) -> Node | None:
        node = self.root
        for page in range(num_pages):
            child = node.children.get(hashes[page])
            if child is None or child.tokens != tuple(token_ids[page * self.page_size : (page + 1) * self.page_size]):
                return None
            node = child
        return node

    # ---- locking ------------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise ValueError("unlocking a node that is not locked")
            node.lock_ref -= 1
            node = node.parent

    # ---- eviction -----------------------------------------------------------------------------------
    def evict_pages(self, num_pages: int) -> int:
        """Free up to ``num_pages`` pages from unlocked leaves; returns how many were freed."""
        heap = [self._leaf_key(n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            *_, node = heapq.heappop(heap)
            parent = node.parent
            self._remove_leaf(node)
            freed += 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, self._leaf_key(parent))
        return freed

    def evict_states(self, num_states: int) -> int:
        """Free up to ``num_states`` checkpoints, superseded ones first, then least recently used; returns
        how many were freed."""
        holders = [n for n in self._nodes() if n.state_slot is not None]
        holders.sort(key=lambda n: (not n.state_superseded, n.state_last_used))
        for node in holders[:num_states]:
            self._drop_state(node)
        return min(num_states, len(holders))

    def _leaf_key(self, node: Node):
        return (node.state_slot is not None, node.last_access, id(node), node)

    def _remove_leaf(self, node: Node) -> None:
        if node.state_slot is not None:
            self._drop_state(node)
        del node.parent.children[node.page_hash]
        del self._page_owner[node.page_id]
        self.pages.free([node.page_id])
        self.num_evicted_pages += 1
        self._page_sum = (self._page_sum - node.page_hash) & _MASK
        self._emit("evicted", node)

    def _drop_state(self, node: Node) -> None:
        self.checkpoint_slots.free([node.state_slot])
        node.state_slot = None
        self.num_cached_states -= 1
        self.num_evicted_states += 1
        self._state_sum = (self._state_sum - node.page_hash) & _MASK
        self._emit("state_evicted", node)

    # ---- integrity ----------------------------------------------------------------------------------
    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_integrity(self) -> None:
        """Raise AssertionError if the tree's bookkeeping is inconsistent."""
        seen_pages, seen_slots = set(), set()
        for node in self._nodes():
            assert node.parent is not None and node.parent.children.get(node.page_hash) is node
            assert node.depth == node.parent.depth + 1
            assert len(node.tokens) == self.page_size
            assert node.page_hash == page_hash(node.parent_hash, node.tokens, node.depth)
            assert self._page_owner.get(node.page_id) is node
            assert not self.pages.is_free(node.page_id), f"cached page {node.page_id} is also free"
            assert node.page_id not in seen_pages
            seen_pages.add(node.page_id)
            assert node.lock_ref >= 0
            assert node.lock_ref >= max((c.lock_ref for c in node.children.values()), default=0)
            if node.state_slot is not None:
                assert not self.checkpoint_slots.is_free(node.state_slot)
                assert node.state_slot not in seen_slots
                seen_slots.add(node.state_slot)
        assert len(seen_pages) == len(self._page_owner)
        assert len(seen_slots) == self.num_cached_states
        nodes = list(self._nodes())
        assert self._page_sum == sum(n.page_hash for n in nodes) & _MASK
        assert self._state_sum == sum(n.page_hash for n in nodes if n.state_slot is not None) & _MASK
