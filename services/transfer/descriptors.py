"""Transfer descriptors: ``(source address, destination address, length)`` triples, and their coalescing.

A prefill pod hands a request over as many page-sized copies (one per KV page per layer, plus the GDN state
slots). Pages a request got from a fresh allocation are often adjacent on both pods, and every descriptor
costs Mooncake a slice (a TCP frame or an RDMA work request), so adjacent copies are merged before they are
submitted. Pure functions: no Mooncake, no torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def coalesce(
    src_addrs: Sequence[int], dst_addrs: Sequence[int], lengths: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    """Merge descriptors that are contiguous on BOTH sides; return new lists sorted by source address.

    Descriptor B extends a run ending at (s, d) when B starts at source s and at destination d. The result
    copies exactly the same bytes to exactly the same places as the input (same multiset of byte mappings),
    and no output descriptor could be merged with another one. A source range may appear more than once
    (one page sent to two places); overlapping destinations are the caller's business, as in Mooncake.

    Raises ValueError when the three lists differ in length, a length is not positive or an address is
    negative.
    """
    n = len(src_addrs)
    if len(dst_addrs) != n or len(lengths) != n:
        raise ValueError(
            f"descriptor lists differ in length: {n} sources, {len(dst_addrs)} destinations, {len(lengths)} lengths"
        )
    for i in range(n):
        if lengths[i] <= 0:
            raise ValueError(f"descriptor {i}: length must be positive, got {lengths[i]}")
        if src_addrs[i] < 0 or dst_addrs[i] < 0:
            raise ValueError(f"descriptor {i}: negative address (src {src_addrs[i]}, dst {dst_addrs[i]})")

    out_src: list[int] = []
    out_dst: list[int] = []
    out_len: list[int] = []
    # Open runs by where they end: (source end, destination end) -> indices of runs ending there. A list,
    # not one index, so that duplicated descriptors each keep extending their own run.
    ends: defaultdict[tuple[int, int], list[int]] = defaultdict(list)
    # Sorted by source, a descriptor comes after every descriptor it could extend (lengths are positive),
    # so one pass merges every chain, even when a source range is used twice with different destinations.
    for i in sorted(range(n), key=lambda i: (src_addrs[i], dst_addrs[i])):
        s, d, length = int(src_addrs[i]), int(dst_addrs[i]), int(lengths[i])
        runs = ends.get((s, d))
        if runs:
            run = runs.pop()
            if not runs:
                del ends[(s, d)]
            out_len[run] += length
        else:
            run = len(out_src)
            out_src.append(s)
            out_dst.append(d)
            out_len.append(length)
        ends[(out_src[run] + out_len[run], out_dst[run] + out_len[run])].append(run)
    return out_src, out_dst, out_len
