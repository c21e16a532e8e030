"""The GPU memory a runner keeps free for activations covers every prefill step measured on the H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.engine.model_runner import activation_reserve_bytes
from services.engine.presets import preset_config

RESULTS = Path(__file__).resolve().parent.parent / "loadtest" / "results"


@pytest.mark.parametrize("name", ["prefill_h200.json", "prefill_ragged_h200.json"])
def test_the_reserve_covers_the_measured_activation_peaks(name):
    measured = json.loads((RESULTS / name).read_text())
    hidden = preset_config(measured["model"]).hidden_size
    peaks = {r["chunk_size"]: r["activation_peak_GiB"] for r in measured["runs"]}
    assert len(peaks) >= 2
    for chunk, peak_gib in peaks.items():
        # The engine sizes its step buffers by max_num_batched_tokens = the chunk in these runs.
        assert activation_reserve_bytes(chunk, hidden) >= peak_gib * 2**30, (chunk, peak_gib)
    assert activation_reserve_bytes(1, hidden) == 2 << 30  # small steps keep the 2 GiB floor
