"""Weight loading: the layouts HF writes, and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine.loader import WeightLoadError
from services.engine.model_config import ModelConfig, UnsupportedModelError
from tests.helpers import DirectSequence, assert_no_leaks, cpu_engine, rel_err
from tests.hf_models import build_hf_model, save_checkpoint

PROMPT = list(range(3, 60, 2))


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def _our_logits(path) -> torch.Tensor:
    engine = cpu_engine(str(path))
    seq = DirectSequence(engine)
    logits = seq.forward(PROMPT)
    seq.close()
    assert_no_leaks(engine)
    return logits


def test_sharded_checkpoint(tmp_path):
    model = build_hf_model("qwen3_5_moe", seed=11)
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3, "the checkpoint should really be split"
    assert rel_err(_our_logits(path), _hf_logits(model)) < 1e-4


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
def test_tied_embeddings(family, tmp_path):
    model = build_hf_model(family, seed=12, tie_word_embeddings=True)
    path = save_checkpoint(model, tmp_path / "tied")
    names = load_file(path / "model.safetensors").keys()
    assert "lm_head.weight" not in names, "HF drops the tied head; Baton must reuse the embedding"
    assert rel_err(_our_logits(path), _hf_logits(model)) < 1e-4


def test_fused_expert_layout(tmp_path):
    """Released Qwen3.5-MoE checkpoints stack each layer's experts: experts.gate_up_proj [E, 2I, H] and
    experts.down_proj [E, H, I]. Rewrite a per-expert checkpoint that way and expect the same logits."""
    model = build_hf_model("qwen3_5_moe", seed=13)
    path = save_checkpoint(model, tmp_path / "fused")
    tensors = load_file(path / "model.safetensors")
    num_experts = model.config.num_experts
    fused = {}
    for name in list(tensors):
        if ".mlp.experts.0.gate_proj.weight" not in name:
            continue
        prefix = name.split("0.gate_proj.weight")[0]
        gate_up = [torch.cat([tensors.pop(f"{prefix}{e}.gate_proj.weight"),
                              tensors.pop(f"{prefix}{e}.up_proj.weight")]) for e in range(num_experts)]
        down = [tensors.pop(f"{prefix}{e}.down_proj.weight") for e in range(num_experts)]
        fused[prefix + "gate_up_proj"] = torch.stack(gate_up)
        fused[prefix + "down_proj"] = torch.stack(down)
    assert fused
    save_file({**tensors, **fused}, path / "model.safetensors", metadata={"format": "pt"})
    assert rel_err(_our_logits(path), _hf_logits(model)) < 1e-4


def _rewrite(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(build_hf_model("qwen3_5_moe", seed=14), tmp_path / "ckpt")


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.3.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"lacks 1 tensor.*model\.layers\.3\.self_attn\.k_proj\.weight"):
        cpu_engine(str(checkpoint))


def test_unexpected_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mystery\.weight"):
        cpu_engine(str(checkpoint))


def test_wrong_shape_is_named(checkpoint):
    def shrink(t):
        name = "model.layers.1.linear_attn.out_proj.weight"
        t[name] = t[name][:, :8].contiguous()

    _rewrite(checkpoint, shrink)
    with pytest.raises(WeightLoadError, match=r"linear_attn\.out_proj\.weight has shape \(64, 8\)"):
        cpu_engine(str(checkpoint))


def test_missing_shard_is_named(tmp_path):
    path = save_checkpoint(build_hf_model("qwen3_5", seed=15), tmp_path / "s", max_shard_size="200KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightLoadError, match=shard.name):
        cpu_engine(str(path))


def test_mtp_weights_are_ignored(checkpoint):
    """Released checkpoints carry multi-token-prediction weights (mtp.*) that serving does not use."""
    _rewrite(checkpoint, lambda t: t.update({"mtp.fc.weight": torch.ones(4, 4)}))
    engine = cpu_engine(str(checkpoint))
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "not a Qwen3.5 hybrid model"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type 'yarn'"),
        ({"linear_num_value_heads": 3}, "multiple of linear_num_key_heads"),
        ({"layer_types": ["full_attention"] * 7 + ["sliding_attention"]}, "unsupported layer types"),
    ],
)
def test_unsupported_configs_are_refused(checkpoint, change, message):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.update(change)
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_dict(raw)


def test_no_weights_in_directory(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(json.loads((save_checkpoint(build_hf_model("qwen3_5"), tmp_path / "x") / "config.json").read_text()))
    )
    with pytest.raises(WeightLoadError, match="no safetensors weights"):
        cpu_engine(str(tmp_path))
