"""Weight loading from an HF model directory (safetensors, single file or sharded) and dummy init.

Every tensor Baton expects gets an entry in a *plan*: the HF name, its shape, and the slices of Baton's
(fused) parameters it fills. Loading walks the checkpoint against the plan, so a tensor that is missing,
unexpected or mis-shaped is reported by its HF name before the engine starts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from kernels.attention import round_to_fp32

from .model import Qwen35ForCausalLM
from .model_config import FULL_ATTENTION, ModelConfig

log = logging.getLogger(__name__)

# Checkpoint tensors that belong to parts Baton does not run.
_IGNORED = (re.compile(r"^model\.visual\."), re.compile(r"^mtp\."), re.compile(r"^model\.mtp\."))

# FP8 KV cache scales of a full-attention layer, under the names vLLM's loader accepts: llm-compressor /
# compressed-tensors (``self_attn.k_scale``), vLLM's own (``self_attn.attn.k_scale``), ModelOpt
# (``self_attn.k_proj.k_scale``, ``self_attn.v_proj.v_scale``) and the deprecated single ``kv_scale`` (both).
# Each is a scalar: the stored fp8 value times the scale is the real K (V).
_KV_SCALE_NAME = re.compile(r"^model\.layers\.(\d+)\.(self_attn\..+)$")
_KV_SCALE_SUFFIXES = {
    "self_attn.k_scale": "k", "self_attn.v_scale": "v", "self_attn.kv_scale": "kv",
    "self_attn.attn.k_scale": "k", "self_attn.attn.v_scale": "v",
    "self_attn.k_proj.k_scale": "k", "self_attn.v_proj.v_scale": "v",
}


class WeightLoadError(ValueError):
    pass


Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PlanEntry:
    shape: tuple[int, ...]
    # (parameter name, index into it, transform of the checkpoint tensor into that slice)
    targets: list[tuple[str, tuple, Transform | None]] = field(default_factory=list)


def _rows(start: int, size: int) -> tuple:
    return (slice(start, start + size),)


def _weight_plan(cfg: ModelConfig, fused_experts: bool) -> dict[str, PlanEntry]:
    h = cfg.hidden_size
    plan: dict[str, PlanEntry] = {}

    def add(name: str, shape: tuple[int, ...], param: str, index: tuple = (), fn: Transform | None = None):
        entry = plan.setdefault(name, PlanEntry(shape))
        entry.targets.append((param, index, fn))

    add("model.embed_tokens.weight", (cfg.vocab_size, h), "embed_tokens")
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", (cfg.vocab_size, h), "lm_head")
    add("model.norm.weight", (h,), "norm.weight")

    for layer in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{layer}.", f"layers.{layer}."
        add(hf + "input_layernorm.weight", (h,), ours + "input_layernorm.weight")
        add(hf + "post_attention_layernorm.weight", (h,), ours + "post_attention_layernorm.weight")
        if cfg.layer_types[layer] == FULL_ATTENTION:
            _plan_attention(cfg, add, hf + "self_attn.", ours + "mixer.")
        else:
            _plan_gdn(cfg, add, hf + "linear_attn.", ours + "mixer.")
        if cfg.layer_is_moe(layer):
            _plan_moe(cfg, add, hf + "mlp.", ours + "mlp.", fused_experts)
        else:
            _plan_swiglu(add, hf + "mlp.", ours + "mlp.", h, cfg.intermediate_size)
    return plan


def _plan_attention(cfg: ModelConfig, add, hf: str, ours: str) -> None:
    h, d = cfg.hidden_size, cfg.head_dim
    q_size, kv_size = cfg.num_attention_heads * d * 2, cfg.num_key_value_heads * d
    for part, start, size in (("q", 0, q_size), ("k", q_size, kv_size), ("v", q_size + kv_size, kv_size)):
        add(f"{hf}{part}_proj.weight", (size, h), ours + "qkv_proj", _rows(start, size))
        if cfg.attention_bias:
            add(f"{hf}{part}_proj.bias", (size,), ours + "qkv_bias", _rows(start, size))
    add(hf + "o_proj.weight", (h, cfg.num_attention_heads * d), ours + "o_proj")
    if cfg.attention_bias:
        add(hf + "o_proj.bias", (h,), ours + "o_bias")
    add(hf + "q_norm.weight", (d,), ours + "q_norm.weight")
    add(hf + "k_norm.weight", (d,), ours + "k_norm.weight")


def _plan_gdn(cfg: ModelConfig, add, hf: str, ours: str) -> None:
    h = cfg.hidden_size
    conv, value, nv = cfg.gdn_conv_dim, cfg.gdn_value_dim, cfg.linear_num_value_heads
    if cfg.family == "qwen3_next":
        # qwen3_next packs q,k,v,z (and b,a) per key-head group; Baton's in_proj wants them de-interleaved.
        nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        ratio = nv // nk
        group = [dk, dk, ratio * dv, ratio * dv]

        def qkvz_part(i: int) -> Transform:
            return lambda w: w.view(nk, sum(group), h).split(group, dim=1)[i].reshape(-1, h)

        def ba_part(i: int) -> Transform:
            return lambda w: w.view(nk, 2 * ratio, h).split([ratio, ratio], dim=1)[i].reshape(-1, h)

        qkvz = hf + "in_proj_qkvz.weight"
        key = cfg.gdn_key_dim
        add(qkvz, (2 * key + 2 * value, h), ours + "in_proj", _rows(0, key), qkvz_part(0))
        add(qkvz, (2 * key + 2 * value, h), ours + "in_proj", _rows(key, key), qkvz_part(1))
        add(qkvz, (2 * key + 2 * value, h), ours + "in_proj", _rows(2 * key, value), qkvz_part(2))
        add(qkvz, (2 * key + 2 * value, h), ours + "in_proj", _rows(conv, value), qkvz_part(3))
        add(hf + "in_proj_ba.weight", (2 * nv, h), ours + "in_proj", _rows(conv + value, nv), ba_part(0))
        add(hf + "in_proj_ba.weight", (2 * nv, h), ours + "in_proj", _rows(conv + value + nv, nv), ba_part(1))
    else:
        add(hf + "in_proj_qkv.weight", (conv, h), ours + "in_proj", _rows(0, conv))
        add(hf + "in_proj_z.weight", (value, h), ours + "in_proj", _rows(conv, value))
        add(hf + "in_proj_b.weight", (nv, h), ours + "in_proj", _rows(conv + value, nv))
        add(hf + "in_proj_a.weight", (nv, h), ours + "in_proj", _rows(conv + value + nv, nv))
    kernel = cfg.linear_conv_kernel_dim
    add(hf + "conv1d.weight", (conv, 1, kernel), ours + "conv_weight", (), lambda w: w.reshape(conv, kernel))
    add(hf + "A_log", (nv,), ours + "A_log")
    add(hf + "dt_bias", (nv,), ours + "dt_bias")
    add(hf + "norm.weight", (cfg.linear_value_head_dim,), ours + "norm_weight")
    add(hf + "out_proj.weight", (h, value), ours + "out_proj")


def _plan_swiglu(add, hf: str, ours: str, hidden: int, inter: int) -> None:
    add(hf + "gate_proj.weight", (inter, hidden), ours + "gate_up_proj", _rows(0, inter))
    add(hf + "up_proj.weight", (inter, hidden), ours + "gate_up_proj", _rows(inter, inter))
    add(hf + "down_proj.weight", (hidden, inter), ours + "down_proj")


def _plan_moe(cfg: ModelConfig, add, hf: str, ours: str, fused_experts: bool) -> None:
    h, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    add(hf + "gate.weight", (experts, h), ours + "router", _rows(0, experts))
    if cfg.shared_expert_in_experts:  # the shared expert is stored as expert E (see model.SparseMoE)
        add(hf + "shared_expert.gate_proj.weight", (inter, h), ours + "w13", (experts, slice(0, inter)))
        add(hf + "shared_expert.up_proj.weight", (inter, h), ours + "w13", (experts, slice(inter, 2 * inter)))
        add(hf + "shared_expert.down_proj.weight", (h, inter), ours + "w2", (experts,))
    else:
        _plan_swiglu(add, hf + "shared_expert.", ours + "shared_expert.", h, cfg.shared_expert_intermediate_size)
    add(hf + "shared_expert_gate.weight", (1, h), ours + "router", _rows(experts, 1))
    if fused_experts:
        # Released Qwen3.5-MoE checkpoints: all experts of a layer in two stacked tensors.
        add(hf + "experts.gate_up_proj", (experts, 2 * inter, h), ours + "w13", _rows(0, experts))
        add(hf + "experts.down_proj", (experts, h, inter), ours + "w2", _rows(0, experts))
        return
    for e in range(experts):
        add(f"{hf}experts.{e}.gate_proj.weight", (inter, h), ours + "w13", (e, slice(0, inter)))
        add(f"{hf}experts.{e}.up_proj.weight", (inter, h), ours + "w13", (e, slice(inter, 2 * inter)))
        add(f"{hf}experts.{e}.down_proj.weight", (h, inter), ours + "w2", (e,))


def _canonical_name(name: str) -> str:
    """Map the multimodal layout (``model.language_model.*``) onto the text-only one (``model.*``)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def kv_scale_name(name: str) -> tuple[int, str] | None:
    """``(layer, "k" | "v" | "kv")`` if ``name`` (canonical) is a KV cache scale, else None."""
    found = _KV_SCALE_NAME.match(name)
    if found is None or found.group(2) not in _KV_SCALE_SUFFIXES:
        return None
    return int(found.group(1)), _KV_SCALE_SUFFIXES[found.group(2)]


def load_kv_scales(model_dir: str | Path, cfg: ModelConfig) -> tuple[list[float], list[float]] | None:
    """Per full-attention layer ``(k_scales, v_scales)`` (fp32 values) from the checkpoint, or None if it has
    none. Every attention layer must have both (a partial set is a broken export, not something to fill with
    1.0 silently), each a positive finite scalar."""
    k: dict[int, float] = {}
    v: dict[int, float] = {}
    both: dict[int, float] = {}
    for f in checkpoint_files(Path(model_dir)):
        with safe_open(f, framework="pt") as reader:
            for raw_name in list(reader.keys()):  # safe_open is not iterable
                parsed = kv_scale_name(_canonical_name(raw_name))
                if parsed is None:
                    continue
                layer, kind = parsed
                if layer >= cfg.num_hidden_layers or cfg.layer_types[layer] != FULL_ATTENTION:
                    raise WeightLoadError(f"{raw_name}: layer {layer} is not a full-attention layer")
                tensor = reader.get_tensor(raw_name).float()
                if tensor.numel() != 1:
                    raise WeightLoadError(f"{raw_name} has shape {tuple(tensor.shape)}: only one scale per layer "
                                          f"(per-tensor) is supported")
                value = tensor.item()
                if not (math.isfinite(value) and value > 0):
                    raise WeightLoadError(f"{raw_name} is {value}: a KV scale must be positive and finite")
                {"k": k, "v": v, "kv": both}[kind][layer] = round_to_fp32(value)
    if not (k or v or both):
        return None
    for layer, value in both.items():  # the deprecated single scale, where no separate one is given
        k.setdefault(layer, value)
        v.setdefault(layer, value)
    layers = cfg.attention_layers
    missing = [f"{kind}_scale of layer {layer}" for layer in layers for kind, got in (("k", k), ("v", v))
               if layer not in got]
    if missing:
        raise WeightLoadError(f"checkpoint {model_dir} has KV scales for some attention layers but lacks "
                              f"{_summarise(missing)}")
    return [k[layer] for layer in layers], [v[layer] for layer in layers]


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no safetensors weights in {model_dir}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise WeightLoadError(f"shard(s) named in the index are missing: {[f.name for f in missing]}")
    return files


def _summarise(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def load_weights(model: Qwen35ForCausalLM, model_dir: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint, or raise WeightLoadError naming the problem."""
    model_dir = Path(model_dir)
    cfg = model.config
    files = checkpoint_files(model_dir)
    names_by_file: dict[Path, list[str]] = {}
    for f in files:
        with safe_open(f, framework="pt") as reader:
            names_by_file[f] = list(reader.keys())
    all_names = {_canonical_name(n) for names in names_by_file.values() for n in names}
    fused_experts = any(n.endswith("mlp.experts.gate_up_proj") for n in all_names)
    plan = _weight_plan(cfg, fused_experts)

    unexpected = sorted(
        n for n in all_names
        if n not in plan
        and not any(p.match(n) for p in _IGNORED)
        and kv_scale_name(n) is None  # read by load_kv_scales, for an fp8 KV cache
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    )
    missing = sorted(n for n in plan if n not in all_names)
    if missing:
        raise WeightLoadError(f"checkpoint {model_dir} lacks {len(missing)} tensor(s): {_summarise(missing)}")
    if unexpected:
        raise WeightLoadError(
            f"checkpoint {model_dir} has {len(unexpected)} tensor(s) this {cfg.family} config does not use: "
            f"{_summarise(unexpected)}"
        )

    params = dict(model.named_parameters(remove_duplicate=False))
    for file_no, f in enumerate(files, start=1):
        log.info("loading weights: shard %d/%d (%s)", file_no, len(files), f.name)
        with safe_open(f, framework="pt") as reader:
            for raw_name in names_by_file[f]:
                name = _canonical_name(raw_name)
                entry = plan.get(name)
                if entry is None:
                    continue
                tensor = reader.get_tensor(raw_name)
                if tuple(tensor.shape) != entry.shape:
                    raise WeightLoadError(
                        f"{raw_name} has shape {tuple(tensor.shape)}, this config expects {entry.shape}"
                    )
                for param_name, index, fn in entry.targets:
                    piece = fn(tensor) if fn is not None else tensor
                    params[param_name].data[index].copy_(piece)


def init_dummy_weights(model: Qwen35ForCausalLM, seed: int = 0) -> None:
    """Random weights with the statistics of a trained-looking model (no zeros: they hide indexing bugs
    and run faster than real data). Norm weights are zero-centred (Gemma style) except the GDN gate norm."""
    gen = torch.Generator(device=model.embed_tokens.device).manual_seed(seed)
    for name, param in model.named_parameters():
        data = param.data
        if name.endswith("A_log"):
            data.uniform_(1.0, 16.0, generator=gen).log_()
        elif name.endswith("dt_bias"):
            data.uniform_(0.5, 1.5, generator=gen)
        elif name.endswith("norm_weight"):
            data.normal_(1.0, 0.05, generator=gen)
        elif name.endswith("norm.weight"):
            data.normal_(0.0, 0.05, generator=gen)
        else:
            data.normal_(0.0, 0.02, generator=gen)
