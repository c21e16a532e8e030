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
- the prompt's resume boundary (``resume_boundary``), so the same prompt can be served again (regenerate,
  retries, best-of-n) from the cache; when a prefill pod computes a prompt for a decode pod it snapshots the
  state there and hands it over with the final state, so the decode pod can do the same from its own cache.
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
    kv_node: object = None  # the deepest matched node, checkpoint or not (a radix_cache.Node)
    kv_page_ids: tuple[int, ...] = ()


def resume_boundary(num_tokens: int, page_size: int) -> int:
    """The deepest page boundary from which a request with these ``num_tokens`` can be served from a cache:
    at least one token must be computed to produce logits, so the last full page before the last token."""
    return (num_tokens - 1) // page_size * page_size


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
        return Admission(result.state_slot, kv_tokens, result.kv_node, tuple(result.kv_page_ids))

    def use_kv_match(self, request: Request, admission: Admission) -> None:
        """For a prompt a prefill pod computes: keep every matched KV page, also past the deepest checkpoint
        (the pod recomputes the state from its own cache; it only needs not to send those pages)."""
        node = admission.kv_node
        if not self.enabled or node is None or node is request.cache_node:
            return
        self.tree.lock(node)
        self.tree.unlock(request.cache_node)
        self.tree.touch(node)
        request.cache_node = node
        request.page_ids = list(admission.kv_page_ids)
        request.num_computed_tokens = request.num_cached_tokens = node.depth * self.page_size

    def reserve_resume_checkpoint(self, request: Request) -> None:
        """For a prompt a prefill pod computes: a checkpoint slot for the state at its resume boundary,
        which the pod writes with the final state (nothing if the cache already has one there or no slot is
        free). Published when the prefill completes (``publish_snapshot``)."""
        boundary = resume_boundary(request.num_tokens, self.page_size)
        start = request.checkpoint_node.depth * self.page_size if request.checkpoint_node is not None else 0
        if not self.enabled or boundary <= start:
            return
        slot = self._allocate_checkpoint()
        if slot is not None:
            request.snapshot_slot, request.snapshot_position = slot, boundary

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
        if request.hold_memory:
            return self._plan_handover_snapshots(request, start, end, samples)
        if num_new_tokens == 1 and samples:
            # Decode: keep one snapshot at the last completed page, overwritten page after page.
            if end % self.page_size:
                return []
            if request.snapshot_slot is None:
                request.snapshot_slot = self._allocate_checkpoint()
                if request.snapshot_slot is None:
                    return []
            return [(1, request.snapshot_slot)]
        positions = self._prefill_checkpoint_positions(start, end, samples)
        # The prompt's resume boundary too, as a prefill pod takes it (_plan_handover_snapshots): the same prompt
        # sent again (regenerate, retries) resumes there, and the GDN layers then split the prompt at the same
        # points on one engine as on a prefill/decode pair, so the two compute the same numbers.
        boundary = resume_boundary(request.num_tokens, self.page_size)
        if start < boundary <= end and boundary not in positions:
            positions = sorted([*positions, boundary])
        return self._allocate_checkpoints(positions, start)

    def _prefill_checkpoint_positions(self, start: int, end: int, samples: bool) -> list[int]:
        interval = self.checkpoint_interval
        positions = list(range((start // interval + 1) * interval, end + 1, interval))
        if samples:  # the prefill's last chunk: its last page boundary is the prompt's checkpoint
            aligned_end = end // self.page_size * self.page_size
            if aligned_end > start and aligned_end not in positions:
                positions.append(aligned_end)
        return positions

    def _allocate_checkpoints(self, positions: list[int], start: int) -> list[tuple[int, int]]:
        plan = []
        for position in positions:
            slot = self._allocate_checkpoint()
            if slot is None:
                break
            plan.append((position - start, slot))
        return plan

    def _plan_handover_snapshots(self, request: Request, start: int, end: int, samples: bool) -> list[tuple[int, int]]:
        """A prefill pod's request: its own snapshot at the resume boundary first (the state it hands over
        for the decode pod's cache; published here on release), then the usual checkpoints. When the prefill
        starts exactly there (this cache had it), the snapshot is at offset 0: the runner copies the state
        the step starts from."""
        positions = self._prefill_checkpoint_positions(start, end, samples)
        boundary = resume_boundary(request.num_tokens, self.page_size)
        plan = []
        if request.snapshot_slot is None and boundary > 0 and start <= boundary <= end:
            request.snapshot_slot = self._allocate_checkpoint()
            if request.snapshot_slot is not None:
                plan.append((boundary - start, request.snapshot_slot))
                positions = [p for p in positions if p != boundary]
        return plan + self._allocate_checkpoints(positions, start)

    def drop_snapshot(self, request: Request) -> None:
        """The snapshot slot holds nothing usable (a prefill pod did not write it)."""
        if request.snapshot_slot is not None:
            self.checkpoint_slots.free([request.snapshot_slot])
        request.snapshot_slot, request.snapshot_position = None, 0

    def publish_snapshot(self, request: Request) -> None:
        """Make the request's snapshot (the state at ``snapshot_position``, computed) a checkpoint of the tree
        now, not at release: a decode pod's resume-boundary checkpoint, once its prefill pod wrote it."""
        if request.snapshot_slot is not None and request.snapshot_position:
            self._publish_pages(request, request.snapshot_position // self.page_size)
            self._attach_snapshot(request)
        self.drop_snapshot(request)

    def _attach_snapshot(self, request: Request) -> None:
        """Attach the snapshot to its node if the tree holds that node; clears ``snapshot_slot`` if taken."""
        if not 0 < request.snapshot_position <= request.num_computed_tokens:  # not computed: never publish
            return
        target = self.tree.node_at(request.all_token_ids, request.page_hashes,
                                   request.snapshot_position // self.page_size)
        if target is not None and self.tree.attach_state(target, request.snapshot_slot):
            self.stats.checkpoints_published += 1
            request.snapshot_slot = None
            self._advance_checkpoint(request, target)

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
            if request.snapshot_slot is not None and node is not None:
                self._attach_snapshot(request)
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
