"""How long a worker's GPU work takes, calibrated from the repository's own GPU measurements.

Source: ``loadtest/results/decode_gpu_h200_35b-a3b-20L.json`` (``python -m loadtest.bench_decode``: Qwen3.5-35B-A3B
dims, 20 of its 40 layers, dummy bf16 weights, one request on an H200, CUDA graphs). The simulated model is the one
measured there; nothing is extrapolated to other layer counts.

Decode step (memory-bound): the bytes one step must read, over the measured copy bandwidth times the fraction of
that roofline the engine reached at the batch's mean context (measured at batch 1; interpolated in context). The
bytes of a batch of B requests: the dense weights once, the routed experts that at least one of the B tokens picks
(expected count ``E (1 - (1 - k/E)^B)`` under uniform routing), and per request its GDN state (read and written)
and its KV. At B = 1 this reproduces the measured step times exactly.

Prefill (compute-bound): the measured time to first token at the two longest contexts gives the marginal rate
(tokens per second between them); the shorter context's fixed part (warm-up of that run) is left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from services.engine.presets import preset_config

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = _REPO / "loadtest" / "results" / "decode_gpu_h200_35b-a3b-20L.json"
_BF16 = 2


@dataclass(frozen=True)
class TimeModel:
    source: str
    gpu: str
    model: str
    copy_bytes_per_s: float
    weights_bytes: float  # one token's weight reads: dense parts + its k routed experts (+ shared)
    expert_bytes: float  # one routed expert's weights summed over the MoE layers
    num_experts: int
    experts_per_token: int
    state_bytes: float  # one request's GDN state, read and written once per step
    kv_bytes_per_token: float  # KV read per context token per step
    efficiency: tuple[tuple[float, float], ...]  # (context, measured fraction of the roofline), by context
    prefill_tokens_per_s: float

    @classmethod
    def from_results(cls, path: Path = DEFAULT_CALIBRATION) -> TimeModel:
        data = json.loads(Path(path).read_text())
        runs = sorted(data["runs"], key=lambda r: r["context"])
        if len(runs) < 2:
            raise ValueError(f"{path}: need decode runs at two contexts at least")
        lo, hi = runs[-2], runs[-1]
        kv_per_token = (hi["bytes_per_token"]["kv"] - lo["bytes_per_token"]["kv"]) / (hi["context"] - lo["context"])
        prefill_rate = (hi["context"] - lo["context"]) / (hi["ttft_s"] - lo["ttft_s"])
        cfg = preset_config(data["model"])
        moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.num_hidden_layers))
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * _BF16 * moe_layers  # gate, up, down
        return cls(
            source=_shown(Path(path)), gpu=data["gpu"], model=data["model"],
            copy_bytes_per_s=data["copy_bandwidth_GBps"] * 1e9,
            weights_bytes=hi["bytes_per_token"]["weights"], expert_bytes=expert, num_experts=cfg.num_experts,
            experts_per_token=cfg.num_experts_per_tok, state_bytes=hi["bytes_per_token"]["gdn_state"],
            kv_bytes_per_token=kv_per_token,
            efficiency=tuple((r["context"], r["fraction_of_roofline"]) for r in runs),
            prefill_tokens_per_s=prefill_rate,
        )

    def decode_step_s(self, batch: int, total_context: float) -> float:
        """One decode step of ``batch`` requests whose contexts sum to ``total_context`` tokens."""
        if batch <= 0:
            raise ValueError("a decode step needs a request")
        e, k = self.num_experts, self.experts_per_token
        extra_experts = e * (1 - (1 - k / e) ** batch) - k
        nbytes = (self.weights_bytes + extra_experts * self.expert_bytes + batch * self.state_bytes
                  + total_context * self.kv_bytes_per_token)
        return nbytes / (self.copy_bytes_per_s * self._efficiency(total_context / batch))

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def _efficiency(self, context: float) -> float:
        points = self.efficiency
        if context <= points[0][0]:
            return points[0][1]
        for (c0, f0), (c1, f1) in zip(points, points[1:], strict=False):
            if context <= c1:
                return f0 + (f1 - f0) * (context - c0) / (c1 - c0)
        return points[-1][1]

    def describe(self) -> dict:
        """What the report records about the calibration (the numbers used, and where they came from)."""
        d = asdict(self)
        d["efficiency"] = [list(p) for p in self.efficiency]
        d["decode_step_ms_examples"] = {
            f"batch {b} at {c // 1024}K": round(self.decode_step_s(b, b * c) * 1e3, 3)
            for b in (1, 8, 32) for c in (1024, 65536)
        }
        return d


def _shown(path: Path) -> str:
    """The path relative to the repository when it is inside it (reports stay comparable across checkouts)."""
    try:
        return str(path.resolve().relative_to(_REPO))
    except ValueError:
        return str(path)
