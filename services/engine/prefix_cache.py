"""The hybrid prefix cache as the scheduler uses it: matching a request against the radix tree,
planning state checkpoints, publishing pages and checkpoints, and returning a request's memory.

Still logic only: where state must move (checkpoint -> working slot at admission, working state ->
checkpoint slot at a publish point) it emits commands that the model runner executes on the device.

Publish points, all at page boundaries:
- every ``checkpoint_interval`` tokens of a prefill (so requests that share only part of a long prompt,
  such as a system prompt, find a checkpoint near where they diverge),
- the last page boundary of a prefill (the prompt's own checkpoint),
- the end of a request: during decode the request overwrites its own snapshot slot each time it
  completes a page; when it finishes, that snapshot becomes the node's checkpoint, so the next turn of
  the conversation resumes at most one page before the previous turn's end.
Checkpoints are taken inside the forward pass at exactly those positions (the GDN layer splits its work
there), so prefill chunks stay as large as the token budget allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from services.common.page_hash import extend_page_hashes

from .allocator import IdPool
from .radix_cache import RadixCache
from .request import Request


@dataclass
class CacheStats:
    prompt_tokens: int = 0  # tokens requests needed computed at admission (prompt, + output if recomputed)
    cached_tokens: int = 0  # of those, served from the cache
    recomputed_missing_state_tokens: int = 0  # KV was cached but no checkpoint lay at its end
    checkpoints_published: int = 0
    checkpoint_slots_unavailable: int = 0  # publish points skipped: every checkpoint slot was held by requests


class Admission(NamedTuple):
    copy_state_from: int | None  # checkpoint slot to copy into the working slot (copy-on-write)
    kv_matched_tokens: int


class HybridPrefixCache:
    def __init__(
        self, page_size: int, pages: IdPool, checkpoint_slots: IdPool, checkpoint_interval: int, enabled: bool,
        record_events: bool = False,
    ) -> None:
        if checkpoint_interval % page_size:
            raise ValueError(f"checkpoint interval {checkpoint_interval} must be a multiple of the page size")
        self.page_size = page_size
        self.pages = pages
        self.checkpoint_slots = checkpoint_slots
        self.checkpoint_interval = checkpoint_interval
        self.enabled = enabled
        self.tree = RadixCache(page_size, pages, checkpoint_slots, record_events=record_events)
        self.stats = CacheStats()

    def _hashes(self, request: Request) -> list[int]:
        return extend_page_hashes(request.page_hashes, request.all_token_ids, self.page_size)

    # ---- admission ----------------------------------------------------------------------------------
    def match(self, request: Request) -> Admission:
        """Start ``request`` from its longest cached prefix that ends at a checkpoint, and lock that path.

        At least one token is always left to compute: the first forward must produce logits. KV pages
        matched past the deepest checkpoint are not used: the GDN layers would have to resume from a
        state at their end, which does not exist, and recomputing from the checkpoint produces those
        tokens' KV anyway (every layer runs for every token), so they are recomputed.
        """
        if not self.enabled:
            return Admission(None, 0)
        tokens = request.all_token_ids
        result = self.tree.match(tokens, self._hashes(request), max_pages=(len(tokens) - 1) // self.page_size)
        self.tree.lock(result.node)
        request.cache_node = result.node
        request.checkpoint_node = result.node if result.state_slot is not None else None
        request.page_ids = list(result.page_ids)
        request.num_computed_tokens = request.num_cached_tokens = result.node.depth * self.page_size
        kv_tokens = min(result.num_kv_pages * self.page_size, len(tokens) - 1)
        return Admission(result.state_slot, kv_tokens)

    def cancel(self, request: Request) -> None:
        """Undo ``match`` for a request that could not be admitted after all."""
        if request.cache_node is not None:
            self.tree.unlock(request.cache_node)
        request.cache_node = request.checkpoint_node = None
        request.page_ids = []
        request.num_computed_tokens = request.num_cached_tokens = 0

    def confirm(self, request: Request, admission: Admission) -> None:
        s = self.stats
        s.prompt_tokens += request.num_tokens
        s.cached_tokens += request.num_cached_tokens
        s.recomputed_missing_state_tokens += max(0, admission.kv_matched_tokens - request.num_cached_tokens)

    # ---- checkpoints --------------------------------------------------------------------------------
    def _allocate_checkpoint(self) -> int | None:
        if not self.checkpoint_slots.can_allocate(1) and not self.tree.evict_states(1):
            self.stats.checkpoint_slots_unavailable += 1
            return None
        return self.checkpoint_slots.allocate_one()

    def plan_snapshots(self, request: Request, num_new_tokens: int, samples: bool) -> list[tuple[int, int]]:
        """Checkpoints to take in this step, as ``(tokens into the step, state slot)``."""
        if not self.enabled:
            return []
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new_tokens
        if num_new_tokens == 1 and samples:
            # Decode: keep one snapshot at the last completed page, overwritten page after page.
            if end % self.page_size:
                return []
            if request.snapshot_slot is None:
                request.snapshot_slot = self._allocate_checkpoint()
                if request.snapshot_slot is None:
                    return []
            return [(1, request.snapshot_slot)]
        interval = self.checkpoint_interval
        positions = list(range((start // interval + 1) * interval, end + 1, interval))
        if samples:  # the prefill's last chunk: its last page boundary is the prompt's checkpoint
            aligned_end = end // self.page_size * self.page_size
            if aligned_end > start and aligned_end not in positions:
                positions.append(aligned_end)
        plan = []
        for position in positions:
            slot = self._allocate_checkpoint()
            if slot is None:
                break
            plan.append((position - start, slot))
        return plan

    def commit(self, request: Request, start: int, snapshots: list[tuple[int, int]]) -> None:
        """After the step ran: publish the prefill checkpoints taken at ``start + offset``."""
        for offset, slot in snapshots:
            position = start + offset
            if slot == request.snapshot_slot:
                request.snapshot_position = position
                continue
            node = self._publish_pages(request, position // self.page_size)
            if node is None or node.depth * self.page_size != position:
                self.checkpoint_slots.free([slot])
                continue
            if self.tree.attach_state(node, slot):
                self.stats.checkpoints_published += 1
            else:  # another request checkpointed this very prefix first: use theirs
                self.checkpoint_slots.free([slot])
            self._advance_checkpoint(request, node)

    def _advance_checkpoint(self, request: Request, node) -> None:
        """``node`` (holding a checkpoint) is now the deepest on the request's path."""
        if request.checkpoint_node is not None and request.checkpoint_node is not node:
            self.tree.supersede(request.checkpoint_node)
        request.checkpoint_node = node

    def _publish_pages(self, request: Request, num_pages: int):
        """Put the request's first ``num_pages`` pages in the tree and move its lock to the new end."""
        if num_pages == 0:
            return None
        tokens = request.all_token_ids
        node = self.tree.insert(tokens, self._hashes(request), request.page_ids[:num_pages])
        if node is not request.cache_node:
            self.tree.lock(node)
            if request.cache_node is not None:
                self.tree.unlock(request.cache_node)
            request.cache_node = node
        return node

    # ---- release ------------------------------------------------------------------------------------
    def release(self, request: Request) -> None:
        """The request is done with its memory (finished, aborted or preempted): its computed full pages
        join the tree, its last decode snapshot becomes a checkpoint, everything else is freed."""
        if self.enabled and request.page_ids:
            node = self._publish_pages(request, min(request.num_computed_tokens // self.page_size,
                                                    len(request.page_ids)))
            if request.snapshot_slot is not None and request.snapshot_position and node is not None:
                target = self.tree.node_at(request.all_token_ids, request.page_hashes,
                                           request.snapshot_position // self.page_size)
                if target is not None and self.tree.attach_state(target, request.snapshot_slot):
                    self.stats.checkpoints_published += 1
                    request.snapshot_slot = None
                    self._advance_checkpoint(request, target)
        if request.snapshot_slot is not None:
            self.checkpoint_slots.free([request.snapshot_slot])
        if request.cache_node is not None:
            self.tree.unlock(request.cache_node)
        private = [p for p in request.page_ids if not self.tree.owns_page(p)]
        self.pages.free(private)
        request.page_ids = []
        request.cache_node = request.checkpoint_node = None
        request.snapshot_slot = None
        request.snapshot_position = 0

    # ---- memory pressure ----------------------------------------------------------------------------
    def evict_pages(self, num_pages: int) -> int:
        return self.tree.evict_pages(num_pages) if self.enabled else 0

    def flush(self) -> None:
        """Drop everything that no running request uses."""
        self.tree.evict_states(self.tree.num_cached_states)
        self.tree.evict_pages(self.tree.num_cached_pages)
