"""Free-list allocation of page ids and state-slot ids: pure bookkeeping, no tensors.

Allocation is all-or-nothing: a request either gets every id it asked for or none, so a failed
allocation never leaves a request half-placed; the scheduler then makes it wait (or preempts).

Two ways to take ids. ``allocate`` pops a LIFO free list (a decode step's one page: O(1)). ``allocate_runs``
takes ids in runs of consecutive ids (a prefill chunk, a prefill pod's destination pages): a PD hand-over
costs Mooncake one descriptor per run of pages adjacent on both pods per attention layer, so pages in runs
hand over at close to a raw write's speed while scattered pages pay a per-descriptor cost each.
"""

from __future__ import annotations

import numpy as np


class OutOfIdsError(RuntimeError):
    pass


class IdPool:
    """A fixed set of integer ids ``first_id .. first_id + capacity - 1`` handed out and returned."""

    def __init__(self, capacity: int, name: str, first_id: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"{name} pool needs a capacity >= 0, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.first_id = first_id
        # Pop from the end, so low ids are handed out first (easier to read in logs and tests). Ids taken by
        # ``allocate_runs`` stay in the list as stale entries (``_is_free`` says so) and are skipped on pop.
        self._free = list(range(first_id + capacity - 1, first_id - 1, -1))
        self._is_free = np.ones(capacity, dtype=bool)
        self._num_free = capacity

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.capacity - self._num_free

    def can_allocate(self, count: int) -> bool:
        return count <= self._num_free

    def _check(self, count: int) -> None:
        if count > self._num_free:
            raise OutOfIdsError(f"{self.name}: asked for {count}, {self._num_free} free of {self.capacity}")

    def allocate(self, count: int) -> list[int]:
        self._check(count)
        ids = []
        while len(ids) < count:
            i = self._free.pop()
            if self._is_free[i - self.first_id]:  # else a stale entry: taken by allocate_runs
                self._is_free[i - self.first_id] = False
                ids.append(i)
        self._num_free -= count
        return ids

    def allocate_one(self) -> int:
        return self.allocate(1)[0]

    def allocate_runs(self, count: int, after: int | None = None) -> list[int]:
        """``count`` ids in as few runs of consecutive ids as the free ids allow, each run ascending.

        Continues the run ending at ``after`` first when the id after it is free (a prefill's next chunk
        stays adjacent to its previous one); then the smallest free run that holds all that is left (best
        fit, which keeps long runs for long requests); else the longest runs first. O(capacity) with numpy:
        for multi-page allocations, not a decode step's single page."""
        self._check(count)
        if count == 0:
            return []
        free = np.flatnonzero(self._is_free)
        # Runs of consecutive free ids: [starts[k], ends[k]) in index space.
        breaks = np.flatnonzero(np.diff(free) != 1) + 1
        starts = free[np.concatenate(([0], breaks))]
        ends = free[np.concatenate((breaks - 1, [len(free) - 1]))] + 1
        runs = list(zip(starts.tolist(), ends.tolist(), strict=True))
        chosen: list[tuple[int, int]] = []
        need = count
        if after is not None and 0 <= after + 1 - self.first_id < self.capacity:
            idx = after + 1 - self.first_id
            for k, (s, e) in enumerate(runs):
                if s <= idx < e:
                    take = min(need, e - idx)
                    chosen.append((idx, idx + take))
                    runs[k] = (s, idx)
                    runs.append((idx + take, e))
                    need -= take
                    break
        if need:
            runs = [(s, e) for s, e in runs if e > s]
            fitting = [(e - s, s) for s, e in runs if e - s >= need]
            if fitting:
                _, s = min(fitting)
                chosen.append((s, s + need))
            else:
                for s, e in sorted(runs, key=lambda r: r[0] - r[1]):  # longest first
                    take = min(need, e - s)
                    chosen.append((s, s + take))
                    need -= take
                    if not need:
                        break
        ids = []
        for s, e in chosen:
            self._is_free[s:e] = False
            ids.extend(range(s + self.first_id, e + self.first_id))
        self._num_free -= count
        if len(self._free) > 2 * self.capacity:  # too many stale entries: rebuild, lowest ids on top
            self._free = (np.flatnonzero(self._is_free)[::-1] + self.first_id).tolist()
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if not self.first_id <= i < self.first_id + self.capacity:
                raise ValueError(f"{self.name}: id {i} out of range")
            if self._is_free[i - self.first_id]:
                raise ValueError(f"{self.name}: id {i} freed twice")
            self._is_free[i - self.first_id] = True
            self._free.append(i)
            self._num_free += 1

    def is_free(self, i: int) -> bool:
        return bool(self._is_free[i - self.first_id])
