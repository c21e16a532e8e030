"""Named architectures for dummy (random-weight) runs: ``--model tiny-qwen3.5-moe --load-format dummy``.

The tiny one is what ``make run`` and the CPU tests serve; the full-size ones are for GPU benchmarks of
real shapes without downloading weights.
"""

from __future__ import annotations

from .model_config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig


def _hybrid_layers(num_layers: int, interval: int = 4) -> tuple[str, ...]:
    return tuple(LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(num_layers))


def tiny_moe(num_layers: int = 8) -> ModelConfig:
    # vocab 512: 256 byte tokens + special tokens, so the byte-level fallback tokenizer covers it.
    return ModelConfig(
        family="qwen3_5_moe",
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=num_layers,
        layer_types=_hybrid_layers(num_layers),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        eos_token_ids=(257,),
        checkpoint_dtype="float32",
    )


def qwen35_35b_a3b(num_layers: int = 40) -> ModelConfig:
    """Qwen3.5-35B-A3B dims (HF ``Qwen3_5MoeTextConfig`` defaults); fewer layers to fit smaller GPUs."""
    return ModelConfig(
        family="qwen3_5_moe",
        vocab_size=248320,
        hidden_size=2048,
        num_hidden_layers=num_layers,
        layer_types=_hybrid_layers(num_layers),
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        rope_theta=10_000_000.0,
        max_position_embeddings=262144,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        eos_token_ids=(248046,),
    )


PRESETS = {
    "tiny-qwen3.5-moe": tiny_moe,
    "qwen3.5-35b-a3b": qwen35_35b_a3b,
}


def preset_config(name: str) -> ModelConfig:
    """Parse ``name`` or ``name:layers`` (e.g. ``qwen3.5-35b-a3b:20``)."""
    base, _, layers = name.partition(":")
    if base not in PRESETS:
        raise ValueError(f"unknown model preset {base!r}; known: {sorted(PRESETS)}")
    return PRESETS[base](int(layers)) if layers else PRESETS[base]()


def model_config_for(model: str, dummy: bool) -> ModelConfig:
    """The architecture of ``model``: a preset name (dummy weights only) or an HF model directory."""
    if model.partition(":")[0] in PRESETS:
        if not dummy:
            raise ValueError(f"preset {model!r} has no weights: use --load-format dummy")
        return preset_config(model)
    return ModelConfig.from_model_dir(model)
