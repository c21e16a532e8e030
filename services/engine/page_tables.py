"""Host int32 copies of the running requests' page lists, for building attention page tables each step.

A request's ``page_ids`` is a Python list that only grows while the request runs (it is replaced by a new
list when the request is admitted, preempted or released). Converting it to a tensor on every decode step
costs time proportional to the context: at 128K tokens, 8K pages, about a millisecond of host time per step
in which the GPU waits. Here each request's pages live in a growable int32 tensor that only receives the
pages added since the last step, so a step costs a few microseconds however long the context is.
"""

from __future__ import annotations

import torch


class _Mirror:
    __slots__ = ("source", "table", "count")

    def __init__(self, source: list[int]) -> None:
        self.source = source  # the list object mirrored: a new list means the request's pages were replaced
        self.table = torch.empty(max(16, 2 * len(source)), dtype=torch.int32)
        self.count = 0


class PageTableMirror:
    def __init__(self) -> None:
        self._mirrors: dict[str, _Mirror] = {}

    def pages(self, request_id: str, page_ids: list[int], num_pages: int) -> torch.Tensor:
        """The first ``num_pages`` entries of ``page_ids`` as an int32 CPU tensor (a view: copy it before the
        request's next step)."""
        mirror = self._mirrors.get(request_id)
        if mirror is None or mirror.source is not page_ids or mirror.count > len(page_ids):
            mirror = self._mirrors[request_id] = _Mirror(page_ids)
        if num_pages > mirror.count:
            if num_pages > mirror.table.numel():
                grown = torch.empty(2 * num_pages, dtype=torch.int32)
                grown[: mirror.count] = mirror.table[: mirror.count]
                mirror.table = grown
            mirror.table[mirror.count : num_pages] = torch.tensor(page_ids[mirror.count : num_pages],
                                                                  dtype=torch.int32)
            mirror.count = num_pages
        return mirror.table[:num_pages]

    def forget(self, request_id: str) -> None:
        self._mirrors.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._mirrors)
