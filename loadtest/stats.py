"""The metric maths of a run, on plain numbers (no clock, no server): percentiles, per-request latencies from
token arrival times, and the summary of a set of request records.

Per request, the runner records when it was sent and each streamed chunk as ``(seconds since send, tokens)``:
- TTFT: the first chunk's time.
- Inter-token latency (ITL): each later chunk's gap from the previous one, spread over its tokens (a chunk of
  k tokens after g seconds is k samples of g/k), the per-token view of Baton's server-side histogram.
- Per-user decode speed: tokens after the first chunk over the time from the first chunk to the last, i.e.
  what a user watching the stream sees once it has started (1 / TPOT).
- End-to-end latency: send to end of stream.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> dict[str, float] | None:
    """Mean and percentiles (``p50``, ...) of ``values``; None when there are none."""
    if not values:
        return None
    out = {"mean": sum(values) / len(values)}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(values, q)
    return out


def inter_token_latencies(chunks: Sequence[tuple[float, int]]) -> list[float]:
    """Per-token gaps from chunk arrival times ``(t, tokens)``: tokens of the first chunk have none."""
    out = []
    for (previous, _), (t, n) in zip(chunks, chunks[1:], strict=False):
        if n > 0:
            out += [(t - previous) / n] * n
    return out


def decode_speed(chunks: Sequence[tuple[float, int]]) -> float | None:
    """Tokens per second after the first chunk (None with fewer than two chunks or no time between them)."""
    if len(chunks) < 2:
        return None
    span = chunks[-1][0] - chunks[0][0]
    tokens = sum(n for _, n in chunks[1:])
    return tokens / span if span > 0 else None


@dataclass
class RequestRecord:
    session: int
    turn: int
    start_s: float  # since the run's clock zero
    prompt_tokens: int  # as sent (a text prompt: the server's count when it gives one)
    max_tokens: int
    reusable_tokens: int | None = None  # longest prefix computed by an earlier finished request (None: text prompt)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (seconds since send, tokens)
    end_s: float | None = None  # since send
    output_tokens: int = 0
    cached_tokens: int | None = None  # from the response's usage
    finish_reason: str | None = None
    error: str | None = None  # kind, e.g. grpc:UNAVAILABLE, http:429, timeout
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    def to_json(self) -> dict:
        out = asdict(self)
        out["chunks"] = [[round(t, 6), n] for t, n in self.chunks]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> RequestRecord:
        obj = dict(obj)
        obj["chunks"] = [(t, n) for t, n in obj.get("chunks", [])]
        return cls(**obj)


def _hit_rate(records: Sequence[RequestRecord]) -> dict:
    reported = [r for r in records if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in reported)
    cached = sum(r.cached_tokens for r in reported)
    with_reusable = [r for r in reported if r.reusable_tokens is not None]
    reusable = sum(r.reusable_tokens for r in with_reusable)
    cached_of_reusable = sum(r.cached_tokens for r in with_reusable)
    return {
        "requests": len(records), "requests_reporting_cache": len(reported), "prompt_tokens": prompt,
        "cached_tokens": cached, "hit_rate": cached / prompt if prompt else None,
        "reusable_tokens": reusable, "reusable_rate": reusable / prompt if prompt and with_reusable else None,
        "cached_of_reusable": cached_of_reusable / reusable if reusable else None,
    }


def summarize(records: Sequence[RequestRecord], duration_s: float, decode_floor_tok_s: float = 70.0) -> dict:
    """Everything reported for one load level, from its request records and its wall time."""
    ok = [r for r in records if r.ok]
    speeds = [s for s in (decode_speed(r.chunks) for r in ok) if s is not None]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    by_turn: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in ok:
        by_turn[r.turn].append(r)
    return {
        "requests": len(records), "ok": len(ok), "errors": dict(Counter(r.error for r in records if not r.ok)),
        "duration_s": duration_s,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": distribution([g for r in ok for g in inter_token_latencies(r.chunks)]),
        "e2e_s": distribution([r.end_s for r in ok if r.end_s is not None]),
        "decode_tok_s_per_user": distribution(speeds, (1, 10, 50, 90)),
        "share_at_decode_floor": sum(s >= decode_floor_tok_s for s in speeds) / len(speeds) if speeds else None,
        "decode_floor_tok_s": decode_floor_tok_s,
        "throughput": {
            "requests_per_s": len(ok) / duration_s if duration_s > 0 else None,
            "output_tok_s": output / duration_s if duration_s > 0 else None,
            "prompt_tok_s": prompt / duration_s if duration_s > 0 else None,
            "output_tokens": output, "prompt_tokens": prompt,
        },
        "cache": _hit_rate(ok),
        "cache_by_turn": {str(turn): _hit_rate(rs) for turn, rs in sorted(by_turn.items())},
    }
