"""How long a worker's GPU work takes, from the repository's own H200 measurements of the full model
(Qwen3.5-35B-A3B, 40 layers, bf16 dummy weights, Triton + flashinfer, CUDA graphs):

- Decode: ``loadtest/results/batch_decode_h200.json`` (``python -m loadtest.bench_batch_decode``), the median step
  at batches 1-256 and contexts of 4K and 32K tokens. A step is modelled as a part that depends on the batch (the
  weights and experts it reads, the GDN states: interpolated between the measured batches) plus a cost per token
  of context in the batch (the KV read), fitted from the difference between the two contexts.
- Prefill: ``loadtest/results/prefill_h200.json`` (``python -m loadtest.bench_prefill``), the time to first token
  of one prompt of 8K-128K tokens at the engine's prefill chunk. Computing tokens ``[start, end)`` of a prompt whose
  first ``start`` are cached costs ``T(end) - T(start)``, T interpolated between the measured lengths: the tokens
  attend to the whole context before them, so later tokens cost more.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_DECODE = _REPO / "loadtest" / "results" / "batch_decode_h200.json"
DEFAULT_PREFILL = _REPO / "loadtest" / "results" / "prefill_h200.json"
_PREFILL_CHUNK = 8192  # the engine's default prefill chunk (services/engine/config.py)


@dataclass(frozen=True)
class TimeModel:
    sources: tuple[str, str]
    gpu: str
    model: str
    batches: tuple[int, ...]  # measured decode batches
    base_step_s: tuple[float, ...]  # per batch: the step without its KV reads
    context_token_s: float  # a step's cost per token of context in the batch
    prefill_lengths: tuple[int, ...]  # measured prompt lengths (0 first)
    prefill_ttft_s: tuple[float, ...]  # time to first token of a whole prompt that long (0 first)

    @classmethod
    def from_results(cls, decode_path: Path = DEFAULT_DECODE, prefill_path: Path = DEFAULT_PREFILL) -> TimeModel:
        decode = json.loads(Path(decode_path).read_text())
        prefill = json.loads(Path(prefill_path).read_text())
        runs = [r for r in decode["runs"] if "step_ms_median" in r]
        by_context: dict[int, dict[int, float]] = {}
        for r in runs:
            by_context.setdefault(r["context"], {})[r["batch"]] = r["step_ms_median"] / 1e3
        if len(by_context) < 2:
            raise ValueError(f"{decode_path}: need decode steps at two contexts at least")
        short, long = sorted(by_context)[0], sorted(by_context)[-1]
        both = sorted(by_context[short].keys() & by_context[long].keys())
        per_token = [(by_context[long][b] - by_context[short][b]) / (b * (long - short)) for b in both]
        context_token_s = float(np.mean(per_token))
        batches = sorted(by_context[short])
        base = [by_context[short][b] - context_token_s * b * short for b in batches]
        points = sorted((r["length"], r["ttft_s"]) for r in prefill["runs"] if r["chunk_size"] == _PREFILL_CHUNK)
        if not points:
            raise ValueError(f"{prefill_path}: no prefill runs at chunk {_PREFILL_CHUNK}")
        return cls(
            sources=(_shown(Path(decode_path)), _shown(Path(prefill_path))), gpu=decode["gpu"], model=decode["model"],
            batches=tuple(batches), base_step_s=tuple(base), context_token_s=context_token_s,
            prefill_lengths=(0, *(p[0] for p in points)), prefill_ttft_s=(0.0, *(p[1] for p in points)),
        )

    def decode_step_s(self, batch: int, total_context: float) -> float:
        """One decode step of ``batch`` requests whose contexts sum to ``total_context`` tokens."""
        if batch <= 0:
            raise ValueError("a decode step needs a request")
        return _interpolate(self.batches, self.base_step_s, batch) + self.context_token_s * total_context

    def prefill_s(self, start: int, end: int) -> float:
        """Computing prompt tokens ``[start, end)`` after ``start`` cached ones."""
        ttft = self.prefill_lengths, self.prefill_ttft_s
        return max(0.0, _interpolate(*ttft, end) - _interpolate(*ttft, start))

    def describe(self) -> dict:
        """What the report records about the calibration (the numbers used, and where they came from)."""
        d = asdict(self)
        d["examples"] = {
            **{f"decode step ms, batch {b} at {c // 1024}K": round(self.decode_step_s(b, b * c) * 1e3, 2)
               for b in (1, 8, 64) for c in (4096, 65536)},
            "prefill s, 50K from scratch": round(self.prefill_s(0, 50_000), 3),
            "prefill s, 1.3K after 55K cached": round(self.prefill_s(55_000, 56_300), 3),
        }
        return d


def _interpolate(xs: tuple, ys: tuple, x: float) -> float:
    """Piecewise linear through the points, extended along the last segment past the last one."""
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (x - xs[-1])
    return float(np.interp(x, xs, ys))


def _shown(path: Path) -> str:
    """The path relative to the repository when it is inside it (reports stay comparable across checkouts)."""
    try:
        return str(path.resolve().relative_to(_REPO))
    except ValueError:
        return str(path)
