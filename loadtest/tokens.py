"""Token ids from names, and names (chained block hashes) from token ids.

``seeded_tokens(key, n, vocab)`` expands a string key into ``n`` token ids with SHAKE-256 (FIPS 202, an
extendable-output hash): the same key gives the same tokens on every machine and Python/numpy version (no RNG
stream whose algorithm could change), a shorter run is a prefix of a longer one, and two keys give unrelated
tokens. Workload files name their prompt text this way instead of storing it, so a 50K-token turn is one short
JSON object.

``BlockHasher`` does the reverse for the Mooncake trace format: it cuts a prompt into fixed-size blocks,
hashes each block chained to its parent (so equal ids mean equal prefixes, not just equal blocks) and numbers
the distinct chain hashes 0, 1, 2, ... in order of first appearance, as the FAST'25 Mooncake traces do.
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Sequence

import numpy as np


def seeded_tokens(key: str, n: int, vocab_size: int) -> list[int]:
    """``n`` token ids in ``[0, vocab_size)`` determined by ``key`` alone: the little-endian uint32 words of
    SHAKE-256(key), each modulo ``vocab_size``."""
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    words = np.frombuffer(hashlib.shake_256(key.encode()).digest(4 * n), dtype="<u4").astype(np.int64)
    return (words % vocab_size).tolist()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return array.array("I", tokens).tobytes()  # 4-byte words on every platform Baton runs on


def block_tokens(trace_key: str, hash_id: int, block_size: int, vocab_size: int) -> list[int]:
    """The tokens of Mooncake block ``hash_id``: equal ids give equal tokens within one trace key."""
    return seeded_tokens(f"{trace_key}/block/{hash_id}", block_size, vocab_size)


class BlockHasher:
    """Numbers prompt blocks the way Mooncake traces do: chained content hashes -> consecutive ints.

    One hasher per trace: ids are shared by every prompt hashed through it.
    """

    def __init__(self, block_size: int = 512) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._ids: dict[bytes, int] = {}

    def hash_ids(self, tokens: Sequence[int]) -> list[int]:
        ids, parent = [], b""
        raw, step = _token_bytes(tokens), 4 * self.block_size
        for start in range(0, len(raw), step):
            block = raw[start:start + step]
            # The length is hashed too: a partial last block never takes a full block's id.
            parent = hashlib.blake2b(parent + len(block).to_bytes(4, "little") + block, digest_size=16).digest()
            ids.append(self._ids.setdefault(parent, len(self._ids)))
        return ids


class PrefixIndex:
    """Which prompt prefixes were computed before, at a granularity of ``block_size`` tokens.

    ``reusable(prompt)`` is the longest prefix of ``prompt`` equal to a prefix of a sequence added earlier, in
    whole blocks, short of the last prompt token (its logits are needed, so it is always computed): what a
    perfect prefix cache of that granularity could serve. Chained block hashes make it a set lookup a block;
    they are Python's own (SipHash, salted per process: this index lives in one process), ~40x cheaper than a
    cryptographic hash, which matters on the client's event loop at 50K-token prompts.
    """

    def __init__(self, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._seen: set[int] = set()

    def _chain(self, tokens: Sequence[int]):
        parent = 0
        raw, step = _token_bytes(tokens), 4 * self.block_size
        for start in range(0, len(raw) - step + 1, step):
            parent = hash((parent, raw[start:start + step]))
            yield parent

    def add(self, tokens: Sequence[int]) -> None:
        self._seen.update(self._chain(tokens))

    def reusable(self, prompt: Sequence[int]) -> int:
        matched = 0
        for digest in self._chain(prompt):
            if digest not in self._seen:
                break
            matched += self.block_size
        return min(matched, max(len(prompt) - 1, 0) // self.block_size * self.block_size)
