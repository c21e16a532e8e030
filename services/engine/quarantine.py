"""Memory a prefill pod may still write into: out of circulation until it is safe again. Bookkeeping only.

A decode pod reserves pages and state slots for a prompt that a prefill pod computes and writes over
Mooncake. When that pod fails without confirming it stopped (its write failed, its call timed out, it
became unreachable), bytes may still land for a while (see services/transfer/engine.py), so the memory is
quarantined under the key of that write (the prefill call's id) instead of being freed. The caller gives it
back when the writer confirms it writes nothing more for that call, or is known to have restarted (the old
process is gone, so are its writes). Until then it is counted in Health and metrics, so an operator sees
memory that a missing pod keeps out of use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .allocator import IdPool


@dataclass(frozen=True)
class QuarantinedMemory:
    key: str  # the write that may still land (a decode pod uses the prefill call's id)
    request_id: str
    pages: tuple[int, ...]
    working_slots: tuple[int, ...]
    checkpoint_slots: tuple[int, ...]


class Quarantine:
    def __init__(self, pages: IdPool, working_slots: IdPool, checkpoint_slots: IdPool) -> None:
        self._pools = (pages, working_slots, checkpoint_slots)
        self._entries: dict[str, QuarantinedMemory] = {}
        self.num_pages = self.num_working_slots = self.num_checkpoint_slots = 0

    def add(self, memory: QuarantinedMemory) -> None:
        if memory.key in self._entries:
            raise ValueError(f"memory is already quarantined under {memory.key!r}")
        self._entries[memory.key] = memory
        self._count(memory, 1)

    def reclaim(self, key: str) -> QuarantinedMemory | None:
        """Return the memory quarantined under ``key`` to the pools (None if there is none)."""
        memory = self._entries.pop(key, None)
        if memory is not None:
            for pool, ids in zip(self._pools, (memory.pages, memory.working_slots, memory.checkpoint_slots),
                                 strict=True):
                pool.free(list(ids))
            self._count(memory, -1)
        return memory

    def entries(self) -> list[QuarantinedMemory]:
        return list(self._entries.values())

    def _count(self, memory: QuarantinedMemory, sign: int) -> None:
        self.num_pages += sign * len(memory.pages)
        self.num_working_slots += sign * len(memory.working_slots)
        self.num_checkpoint_slots += sign * len(memory.checkpoint_slots)
