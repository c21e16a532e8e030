"""What one forward pass needs to know about the sequences in it, built per step by the model runner.

Tokens of all sequences are packed back to back (no padding). Sequence ``i`` contributes
``query_lens[i]`` new tokens, has ``kv_lens[i]`` tokens in the cache once they are written, and owns
the GDN state slot ``state_slots[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token in its sequence
    query_lens: list[int]
    kv_lens: list[int]
    page_tables: list[list[int]]  # per sequence (host): page ids covering kv_lens tokens
    kv_slot_ids: torch.Tensor  # [T] int64, page_id * page_size + offset where each token's K/V goes
    state_slots: torch.Tensor  # [B] int64
    # False for a sequence starting at position 0: its GDN conv/SSM state starts from zeros instead of
    # whatever a recycled slot holds.
    has_initial_state: list[bool]
    logits_indices: torch.Tensor  # [S] rows of the packed tokens whose logits are wanted
    # Per sequence: (tokens into this step, state slot) where the GDN state must also be written, for
    # prefix-cache checkpoints taken at exact positions.
    snapshots: list[list[tuple[int, int]]] | None = None
    # Per sequence: tokens into this step where the GDN recurrence is split into pieces although no state is
    # stored there (the prompt's resume boundary): a prompt resumed there from a cache, or computed on a
    # prefill pod that snapshots there, is computed in these same pieces, so its numbers do not depend on
    # whether a checkpoint slot was free.
    gdn_splits: list[list[int]] | None = None
    # Set by the model once per forward pass: the GDN kernels' precomputed chunk tables (GPU ops only).
    gdn_plan: object = None

    @property
    def checkpoints(self) -> list[tuple[int, int, int]]:
        """``snapshots`` flattened to ``(sequence, tokens into the step, slot)``."""
        if self.snapshots is None:
            return []
        return [(seq, offset, slot) for seq, snaps in enumerate(self.snapshots) for offset, slot in snaps]

    @property
    def splits(self) -> list[tuple[int, int]]:
        """``gdn_splits`` flattened to ``(sequence, tokens into the step)``."""
        if self.gdn_splits is None:
            return []
        return [(seq, offset) for seq, offsets in enumerate(self.gdn_splits) for offset in offsets]

    @property
    def cu_seqlens(self) -> list[int]:
        return [*self.query_starts, sum(self.query_lens)]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token to an existing state: the batched recurrent path applies."""
        return all(q == 1 for q in self.query_lens) and all(self.has_initial_state)

    @property
    def query_starts(self) -> list[int]:
        starts, total = [], 0
        for q in self.query_lens:
            starts.append(total)
            total += q
        return starts
