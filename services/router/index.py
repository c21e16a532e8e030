"""The router's index of every worker's prefix cache, built from the workers' own cache events. Logic only
(no torch, no Redis).

For each page hash: which workers hold that page's KV, and which hold a GDN state checkpoint at its end.
A page hash names a whole prefix (the hash chains through every earlier page), so a worker that holds page
``d`` of a prompt holds pages ``1..d`` as well: its prefix cache is a tree and only leaves are evicted. The
index keeps that true per worker (an event that would break it is refused, and the caller resynchronises the
worker from a snapshot).

What a worker can reuse of a prompt is not its KV match but the deepest matched page where it holds a
checkpoint: a GDN state is valid at one position only, so KV past the last checkpoint is recomputed (see
services/engine/radix_cache.py). ``usable_pages`` returns exactly that, and ``kv_pages`` the KV match for
comparison.

Memory: a page held by one worker costs one dict entry holding an int; only pages held by several workers
(shared system prompts) hold a set. Workers are small ints inside, names outside.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from services.cluster.schema import Segment
from services.common.page_hash import ROOT_HASH
from services.engine.radix_cache import CacheDigest

_MASK = (1 << 64) - 1


class InconsistentEvents(ValueError):
    """A batch does not fit the worker's cache as indexed (a lost event, a bug): the worker must be rebuilt
    from a snapshot. The batch was applied up to the event named."""


@dataclass
class _WorkerCache:
    slot: int
    pages: set[int] = field(default_factory=set)
    states: set[int] = field(default_factory=set)
    page_sum: int = 0
    state_sum: int = 0

    @property
    def digest(self) -> CacheDigest:
        return CacheDigest(len(self.pages), len(self.states), self.page_sum, self.state_sum)


def _add(holders: dict, key: int, slot: int) -> None:
    current = holders.get(key)
    if current is None:
        holders[key] = slot
    elif type(current) is int:
        if current != slot:
            holders[key] = {current, slot}
    else:
        current.add(slot)


def _add_all(holders: dict, keys: set[int], slot: int) -> None:
    new = keys.difference(holders)  # one C loop: the keys no worker held
    holders.update(dict.fromkeys(new, slot))
    if len(new) < len(keys):
        for key in keys - new:
            _add(holders, key, slot)


def _remove_all(holders: dict, keys: set[int], slot: int) -> None:
    for key in keys:
        if holders[key] == slot:
            del holders[key]
        else:
            _remove(holders, key, slot)


def _few(keys: set[int]) -> str:
    return ", ".join(f"{k:x}" for k in sorted(keys)[:3])


def _remove(holders: dict, key: int, slot: int) -> None:
    current = holders.get(key)
    if type(current) is int:
        if current == slot:
            del holders[key]
    elif current is not None:
        current.discard(slot)
        if len(current) == 1:
            holders[key] = next(iter(current))


class CacheIndex:
    def __init__(self) -> None:
        self._page_holders: dict[int, int | set[int]] = {}
        self._state_holders: dict[int, int | set[int]] = {}
        self._workers: dict[str, _WorkerCache] = {}
        self._names: list[str | None] = []  # slot -> worker name
        self._free_slots: list[int] = []
        self.events_applied = 0

    # ---- workers ------------------------------------------------------------------------------------
    def register(self, name: str) -> int:
        """The small int that stands for ``name`` in the index (assigned on first use)."""
        return self._worker(name).slot

    def slot_of(self, name: str) -> int | None:
        cache = self._workers.get(name)
        return None if cache is None else cache.slot

    @property
    def num_slots(self) -> int:
        return len(self._names)

    def _worker(self, name: str) -> _WorkerCache:
        cache = self._workers.get(name)
        if cache is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._names[slot] = name
            else:
                slot = len(self._names)
                self._names.append(name)
            cache = self._workers[name] = _WorkerCache(slot)
        return cache

    def clear_worker(self, name: str) -> None:
        """Forget what ``name`` holds (its index is out of step, or about to be rebuilt); keep its slot."""
        cache = self._workers.get(name)
        if cache is None:
            return
        _remove_all(self._page_holders, cache.pages, cache.slot)
        _remove_all(self._state_holders, cache.states, cache.slot)
        cache.pages, cache.states, cache.page_sum, cache.state_sum = set(), set(), 0, 0

    def drop_worker(self, name: str) -> None:
        """Forget ``name`` altogether (gone, or restarted as a new instance)."""
        self.clear_worker(name)
        cache = self._workers.pop(name, None)
        if cache is not None:
            self._names[cache.slot] = None
            self._free_slots.append(cache.slot)

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def digest(self, name: str) -> CacheDigest:
        cache = self._workers.get(name)
        return cache.digest if cache is not None else CacheDigest(0, 0, 0, 0)

    @property
    def num_pages(self) -> int:
        """Distinct pages held anywhere."""
        return len(self._page_holders)

    @property
    def num_page_entries(self) -> int:
        """(worker, page) pairs."""
        return sum(len(c.pages) for c in self._workers.values())

    # ---- events -------------------------------------------------------------------------------------
    def apply(self, name: str, segments: list[Segment]) -> None:
        """Apply one batch of ``name``'s events. Raises InconsistentEvents if an event does not fit what the
        index holds for ``name``; what it then holds for ``name`` is unspecified until ``replace`` rebuilds it.

        Every page every pod stores or evicts passes here once, so each group of a segment is a handful of set
        operations (C loops) rather than a Python loop over its events; only pages held by several workers
        (shared system prompts) and evictions take a short Python loop."""
        cache = self._worker(name)
        for segment in segments:
            self._apply_segment(name, cache, segment)
            self.events_applied += len(segment)

    def _apply_segment(self, name: str, cache: _WorkerCache, segment: Segment) -> None:
        slot, pages, states = cache.slot, cache.pages, cache.states
        state_evicted, evicted, stored, state_stored = (
            set(segment.state_evicted), set(segment.evicted), set(segment.stored), set(segment.state_stored))
        if len(state_evicted) + len(evicted) + len(stored) + len(state_stored) != len(segment):
            raise InconsistentEvents(f"{name}: a page appears twice in one group of events")
        if not state_evicted <= states:
            raise InconsistentEvents(f"{name}: evicted checkpoints not held: {_few(state_evicted - states)}")
        states -= state_evicted
        _remove_all(self._state_holders, state_evicted, slot)
        if not evicted <= pages or not evicted.isdisjoint(states):
            raise InconsistentEvents(f"{name}: evicted pages not held or with a checkpoint: "
                                     f"{_few((evicted - pages) | (evicted & states))}")
        pages -= evicted
        _remove_all(self._page_holders, evicted, slot)
        orphans = set(segment.stored_parents)
        orphans -= stored
        orphans.discard(ROOT_HASH)
        if not stored.isdisjoint(pages) or not orphans <= pages:
            raise InconsistentEvents(f"{name}: pages stored again or without their parent: "
                                     f"{_few((stored & pages) | (orphans - pages))}")
        pages |= stored
        _add_all(self._page_holders, stored, slot)
        if not state_stored <= pages or not state_stored.isdisjoint(states):
            raise InconsistentEvents(f"{name}: checkpoints stored on pages not held, or again: "
                                     f"{_few((state_stored - pages) | (state_stored & states))}")
        states |= state_stored
        _add_all(self._state_holders, state_stored, slot)
        cache.page_sum = (cache.page_sum + sum(stored) - sum(evicted)) & _MASK
        cache.state_sum = (cache.state_sum + sum(state_stored) - sum(state_evicted)) & _MASK

    def replace(self, name: str, segments: list[Segment]) -> None:
        """Rebuild ``name`` from a snapshot (events that build its cache from empty)."""
        self.clear_worker(name)
        self.apply(name, segments)

    # ---- queries ------------------------------------------------------------------------------------
    def usable(self, hashes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """For a prompt whose page hashes are ``hashes``: the workers (slots) that can resume it from a
        checkpoint, and how many of its leading pages each can skip (the depth of the deepest matched page
        where it holds a checkpoint). Workers with nothing usable are left out.

        A page hash names its whole prefix, and a worker holding a checkpoint at a page holds every page
        before it, so only the prompt's pages that carry a checkpoint somewhere matter: they are found with
        one set intersection (a C loop) rather than a Python walk down 3,125 pages of a 50K-token prompt. Then
        the holders from the deepest up, each worker taking the first depth it is found at, again as set
        operations: a system prompt's checkpoints shared by a thousand workers cost a few C loops."""
        state_holders, page_holders = self._state_holders, self._page_holders
        # Where the prompt's cached prefix ends anywhere (a page held means its parent is held): binary search.
        held = bisect.bisect_left(range(len(hashes)), True, key=lambda i: hashes[i] not in page_holders)
        depth_of = dict(zip(hashes[:held], range(1, held + 1), strict=True))
        found = state_holders.keys() & depth_of.keys()
        holders = list(map(state_holders.__getitem__, found))
        depths = list(map(depth_of.__getitem__, found))
        # Checkpoints held by one worker (most): the deepest per worker wins, sorting then keeping the last.
        best = dict(sorted(((h, d) for h, d in zip(holders, depths, strict=True) if type(h) is int),
                           key=itemgetter(1)))
        # Held by several (shared prefixes): deepest first, each worker keeping the first depth it gets.
        shared = sorted(((d, h) for h, d in zip(holders, depths, strict=True) if type(h) is not int),
                        key=itemgetter(0), reverse=True)
        everyone, settled = len(self._workers), set()  # settled: seen in a set, so at its deepest already
        for depth, holder_set in shared:
            if len(settled) == everyone:
                break
            fresh = holder_set - settled
            if not fresh:
                continue
            settled |= fresh
            keep = {slot for slot in fresh & best.keys() if best[slot] > depth}  # a deeper one of its own
            best.update(dict.fromkeys(fresh - keep, depth))
        return (np.fromiter(best.keys(), dtype=np.int64, count=len(best)),
                np.fromiter(best.values(), dtype=np.int64, count=len(best)))

    def usable_pages(self, hashes: Sequence[int]) -> dict[str, int]:
        """``usable`` by worker name."""
        slots, pages = self.usable(hashes)
        return {self._names[slot]: page for slot, page in zip(slots.tolist(), pages.tolist(), strict=True)}

    def kv_pages(self, name: str, hashes: Sequence[int]) -> int:
        """How many leading pages of the prompt ``name`` holds the KV of, checkpoint or not (binary search:
        its pages are prefix-closed)."""
        cache = self._workers.get(name)
        if cache is None:
            return 0
        pages = cache.pages
        return bisect.bisect_left(range(len(hashes)), True, key=lambda i: hashes[i] not in pages)
