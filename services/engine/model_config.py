"""The model's architecture, read from an HF ``config.json`` (or built from a preset for dummy weights).

Accepts the three HF families that share the Qwen3.5 hybrid layout (``qwen3_5_moe``, ``qwen3_5``,
``qwen3_next``) in both shapes HF writes: the text-only config and the multimodal one that nests the text
model under ``text_config``. Anything Baton cannot run faithfully is refused here, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"

# model_type (outer or text_config's) -> family
_FAMILIES = {
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_next": "qwen3_next",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's config describes something Baton does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "qwen3_5_moe" | "qwen3_5" | "qwen3_next"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    # Gated DeltaNet
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    # MLP / MoE
    intermediate_size: int = 0  # dense MLP width (qwen3_5, and qwen3_next's mlp_only_layers)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # misc
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "bfloat16"
    # Where the text weights live in the checkpoint: "model." or "model.language_model."
    weight_prefix: str = "model."
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.family not in set(_FAMILIES.values()):
            raise UnsupportedModelError(f"unknown model family {self.family!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedModelError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = set(self.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION}
        if bad:
            raise UnsupportedModelError(f"unsupported layer types {sorted(bad)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise UnsupportedModelError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise UnsupportedModelError(f"rotary dim {self.rotary_dim} must be even and in (0, head_dim]")
        if self.is_moe_family and (self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts):
            raise UnsupportedModelError("MoE model needs num_experts > 0 and 0 < num_experts_per_tok <= num_experts")

    # ---- derived layout -------------------------------------------------------------------------
    @property
    def is_moe_family(self) -> bool:
        return self.family in ("qwen3_5_moe", "qwen3_next") and self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_key_dim + self.gdn_value_dim

    @property
    def shared_expert_in_experts(self) -> bool:
        """The shared expert has the routed experts' shape, so it is stored as one more expert (index E) and
        the MoE kernels compute it with the routed ones: one grouped GEMM pair instead of two more GEMMs and
        their elementwise glue per layer. (Every released Qwen3.5 / Qwen3-Next MoE model has this shape.)"""
        return self.is_moe_family and self.shared_expert_intermediate_size == self.moe_intermediate_size

    def layer_is_moe(self, layer: int) -> bool:
        if not self.is_moe_family:
            return False
        if self.family == "qwen3_5_moe":
            return True
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    # ---- parsing ---------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {model_dir}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    @classmethod
    def from_hf_dict(cls, raw: dict) -> ModelConfig:
        outer_type = raw.get("model_type", "")
        weight_prefix = "model."
        text = raw
        if "text_config" in raw and raw["text_config"] is not None:
            # Multimodal checkpoint (Qwen3_5*ForConditionalGeneration): text weights under model.language_model.
            text = dict(raw["text_config"])
            weight_prefix = "model.language_model."
            text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
            if text.get("eos_token_id") is None and raw.get("eos_token_id") is not None:
                text["eos_token_id"] = raw["eos_token_id"]
        model_type = text.get("model_type", outer_type)
        family = _FAMILIES.get(model_type) or _FAMILIES.get(outer_type)
        if family is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a Qwen3.5 hybrid model "
                f"(supported: {sorted(set(_FAMILIES))})"
            )
        act = text.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} unsupported (only silu)")

        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope_type {rope_type!r} unsupported (only default)")
        rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))
        partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))

        num_layers = int(text["num_hidden_layers"])
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = int(text.get("full_attention_interval", 4))
            layer_types = [
                LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(num_layers)
            ]
        eos = text.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        dtype = str(text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or "bfloat16")
        known = set(cls.__dataclass_fields__)
        return cls(
            family=family,
            vocab_size=int(text["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            layer_types=tuple(layer_types),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or hidden // heads),
            attention_bias=bool(text.get("attention_bias", False)),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
            linear_key_head_dim=int(text.get("linear_key_head_dim", 128)),
            linear_value_head_dim=int(text.get("linear_value_head_dim", 128)),
            linear_num_key_heads=int(text.get("linear_num_key_heads", 16)),
            linear_num_value_heads=int(text.get("linear_num_value_heads", 32)),
            intermediate_size=int(text.get("intermediate_size") or 0),
            num_experts=int(text.get("num_experts") or 0) if family != "qwen3_5" else 0,
            num_experts_per_tok=int(text.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(text.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(text.get("norm_topk_prob", True)) if family == "qwen3_next" else True,
            decoder_sparse_step=int(text.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(text.get("mlp_only_layers") or ()),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype.replace("torch.", ""),
            weight_prefix=weight_prefix,
            extra={k: v for k, v in text.items() if k not in known},
        )
