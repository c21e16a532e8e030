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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.cluster.schema import EVICTED, STATE_EVICTED, STATE_STORED, STORED, Events
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

    def drop_worker(self, name: str) -> None:
        """Forget everything about ``name`` (gone, restarted, or about to be rebuilt)."""
        cache = self._workers.pop(name, None)
        if cache is None:
            return
        for h in cache.pages:
            _remove(self._page_holders, h, cache.slot)
        for h in cache.states:
            _remove(self._state_holders, h, cache.slot)
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
    def apply(self, name: str, events: Events) -> None:
        """Apply one batch of ``name``'s events in order. Raises InconsistentEvents at the first event that
        does not fit (the events before it are applied)."""
        cache = self._worker(name)
        slot, pages, states = cache.slot, cache.pages, cache.states
        page_holders, state_holders = self._page_holders, self._state_holders
        page_sum, state_sum = cache.page_sum, cache.state_sum
        applied = 0
        try:
            for kind, h, parent in zip(events.kinds, events.hashes, events.parents, strict=True):
                if kind == STORED:
                    if h in pages or (parent != ROOT_HASH and parent not in pages):
                        why = "again" if h in pages else "without its parent"
                        raise InconsistentEvents(f"{name}: stored page {h:x} {why}")
                    pages.add(h)
                    _add(page_holders, h, slot)
                    page_sum += h
                elif kind == EVICTED:
                    if h not in pages or h in states:
                        why = "with its checkpoint" if h in states else "not held"
                        raise InconsistentEvents(f"{name}: evicted page {h:x} {why}")
                    pages.remove(h)
                    _remove(page_holders, h, slot)
                    page_sum -= h
                elif kind == STATE_STORED:
                    if h not in pages or h in states:
                        why = "again" if h in states else "on a page not held"
                        raise InconsistentEvents(f"{name}: checkpoint at page {h:x} {why}")
                    states.add(h)
                    _add(state_holders, h, slot)
                    state_sum += h
                elif kind == STATE_EVICTED:
                    if h not in states:
                        raise InconsistentEvents(f"{name}: evicted checkpoint {h:x} not held")
                    states.remove(h)
                    _remove(state_holders, h, slot)
                    state_sum -= h
                applied += 1
        finally:
            cache.page_sum, cache.state_sum = page_sum & _MASK, state_sum & _MASK
            self.events_applied += applied

    def replace(self, name: str, events: Events) -> None:
        """Rebuild ``name`` from a snapshot (events that build its cache from empty)."""
        self.drop_worker(name)
        self.apply(name, events)

    # ---- queries ------------------------------------------------------------------------------------
    def usable_pages(self, hashes: Sequence[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """Per worker (all, or those named), how many leading pages of a prompt whose page hashes are
        ``hashes`` it can resume from: the depth of the deepest of them where it holds a checkpoint. Workers
        with no usable page are left out."""
        page_holders, state_holders = self._page_holders, self._state_holders
        best: dict[int, int] = {}
        depth = 0
        for h in hashes:
            if h not in page_holders:  # nobody holds this page, so nobody holds any deeper one
                break
            depth += 1
            holders = state_holders.get(h)
            if holders is None:
                continue
            if type(holders) is int:
                best[holders] = depth
            else:
                for slot in holders:
                    best[slot] = depth
        names = self._names
        found = {names[slot]: pages for slot, pages in best.items()}
        if workers is not None:
            wanted = set(workers)
            found = {name: pages for name, pages in found.items() if name in wanted}
        return found

    def kv_pages(self, name: str, hashes: Sequence[int]) -> int:
        """How many leading pages of the prompt ``name`` holds the KV of, checkpoint or not (binary search:
        its pages are prefix-closed)."""
        cache = self._workers.get(name)
        if cache is None:
            return 0
        pages = cache.pages
        return bisect.bisect_left(range(len(hashes)), True, key=lambda i: hashes[i] not in pages)
