"""Tiny random HF checkpoints of the three Qwen3.5-hybrid families, written with ``save_pretrained``.

Weights are HF's random init plus noise on the norms (zero-initialised Gemma norms would hide a missing
``1 + w``), and a larger init std so greedy argmax margins are wide enough to compare token-for-token.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

# The reference is HF's plain-torch path. Where flash-linear-attention is importable (the GDN benchmarks'
# peer, installed on GPU machines) HF swaps in fla's kernels when its Qwen3.5 modules are first imported,
# and those are not exact: the fp32 comparison failed at rel err 0.052 against 1e-4 without fla (H100).
# Blocking the import makes HF fall back to its torch functions; nothing in the test suite uses fla.
sys.modules.setdefault("fla", None)

import transformers  # noqa: E402  (after the fla block: HF resolves its kernels at import)

FAMILIES = ("qwen3_5_moe", "qwen3_5", "qwen3_next")

_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=8,  # layers 3 and 7 are full attention
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # rotary dim 8 (partial_rotary_factor 0.25)
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    initializer_range=0.08,
    max_position_embeddings=4096,
    eos_token_id=None,
    pad_token_id=None,
    bos_token_id=None,
)


def hf_config(family: str, tie_word_embeddings: bool = False, **overrides):
    kw = dict(_COMMON, tie_word_embeddings=tie_word_embeddings)
    kw.update(overrides)
    if family == "qwen3_5_moe":
        # Shared expert of the experts' shape, as in the released models: Baton stores it as expert E.
        # (qwen3_next below keeps a wider one: the separate shared-MLP path.)
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        return transformers.Qwen3_5MoeTextConfig(**kw)
    if family == "qwen3_5":
        kw.update(intermediate_size=96)
        return transformers.Qwen3_5TextConfig(**kw)
    if family == "qwen3_next":
        # Exercise what only qwen3_next has: un-normalised top-k, a dense layer among MoE layers.
        kw.update(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1],
        )
        return transformers.Qwen3NextConfig(**kw)
    raise ValueError(family)


def _causal_lm_class(family: str):
    return {
        "qwen3_5_moe": transformers.Qwen3_5MoeForCausalLM,
        "qwen3_5": transformers.Qwen3_5ForCausalLM,
        "qwen3_next": transformers.Qwen3NextForCausalLM,
    }[family]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def build_hf_model(family: str, seed: int = 0, tie_word_embeddings: bool = False, multimodal: bool = False):
    """A random HF model (fp32, eval mode) of the family; ``multimodal`` wraps it as the released
    ``*ForConditionalGeneration`` layout with a tiny vision tower."""
    torch.manual_seed(seed)
    text_config = hf_config(family, tie_word_embeddings)
    if multimodal:
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)
        if family == "qwen3_5_moe":
            cfg = transformers.Qwen3_5MoeConfig(
                text_config=text_config.to_dict(), vision_config=vision, tie_word_embeddings=tie_word_embeddings
            )
            model = transformers.Qwen3_5MoeForConditionalGeneration(cfg)
        elif family == "qwen3_5":
            cfg = transformers.Qwen3_5Config(
                text_config=text_config.to_dict(), vision_config=vision, tie_word_embeddings=tie_word_embeddings
            )
            model = transformers.Qwen3_5ForConditionalGeneration(cfg)
        else:
            raise ValueError(f"{family} has no multimodal layout")
    else:
        model = _causal_lm_class(family)(text_config)
    _perturb(model, seed)
    return model.eval()


def save_checkpoint(model, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def with_tensors(checkpoint: Path, out: Path, tensors: dict[str, torch.Tensor]) -> str:
    """A copy of a single-file checkpoint with extra tensors (e.g. fp8 KV cache scales)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    weights = load_file(out / "model.safetensors")
    weights.update(tensors)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def kv_scales(scales: dict[int, tuple[float, float]]) -> dict[str, torch.Tensor]:
    """``{layer: (k_scale, v_scale)}`` as checkpoint tensors, under llm-compressor's names."""
    return {f"model.layers.{layer}.self_attn.{kind}_scale": torch.tensor(scale)
            for layer, pair in scales.items() for kind, scale in zip("kv", pair, strict=True)}
