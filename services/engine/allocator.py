"""Free-list allocation of page ids and state-slot ids: pure bookkeeping, no tensors.

Allocation is all-or-nothing: a request either gets every id it asked for or none, so a failed
allocation never leaves a request half-placed; the scheduler then makes it wait (or preempts).
"""

from __future__ import annotations


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
        # Pop from the end, so low ids are handed out first (easier to read in logs and tests).
        self._free = list(range(first_id + capacity - 1, first_id - 1, -1))
        self._is_free = [True] * capacity

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfIdsError(f"{self.name}: asked for {count}, {len(self._free)} free of {self.capacity}")
        ids = [self._free.pop() for _ in range(count)]
        for i in ids:
            self._is_free[i - self.first_id] = False
        return ids

    def allocate_one(self) -> int:
        return self.allocate(1)[0]

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if not self.first_id <= i < self.first_id + self.capacity:
                raise ValueError(f"{self.name}: id {i} out of range")
            if self._is_free[i - self.first_id]:
                raise ValueError(f"{self.name}: id {i} freed twice")
            self._is_free[i - self.first_id] = True
            self._free.append(i)

    def is_free(self, i: int) -> bool:
        return self._is_free[i - self.first_id]
