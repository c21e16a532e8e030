"""The decode step as the fewest kernels (``model_costs.decode_kernel_chain``) and the stream kernels that time it
(timed by ``loadtest.bench_decode_floor``): the chain moves exactly the step's bytes on every architecture and
loads early only what no kernel of the step writes and whose address is known."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.model_costs import decode_kernel_chain, decode_step_bytes
from services.engine.model import Qwen35ForCausalLM
from services.engine.model_config import ModelConfig
from services.engine.ops import torch_ops
from services.engine.presets import preset_config
from tests.hf_models import FAMILIES, hf_config


def _params(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    model = Qwen35ForCausalLM(cfg, torch.bfloat16, "meta", torch_ops(), page_size=16)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


CONFIGS = {
    **{f"{family}{'-tied' if tied else ''}": ModelConfig.from_hf_dict(hf_config(family, tied).to_dict())
       for family in FAMILIES for tied in (False, True)},
    "35b-a3b:4": preset_config("qwen3.5-35b-a3b:4"),
}


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), contexts=st.lists(st.integers(0, 5000), min_size=1, max_size=9),
       touched=st.integers(1, 8), kv_fp8=st.booleans())
def test_chain_moves_the_steps_bytes(name, contexts, touched, kv_fp8):
    cfg = CONFIGS[name]
    params = _params(cfg)
    num_moe = sum(n.endswith(".w13") for n, _ in params)
    kv_dtype = torch.float8_e4m3fn if kv_fp8 else None
    chain = decode_kernel_chain(params, cfg, torch.bfloat16, contexts, [touched] * num_moe, kv_dtype)
    total = decode_step_bytes(params, cfg, torch.bfloat16, contexts, [touched] * num_moe, kv_dtype)["total"]
    assert sum(k.read_bytes + k.write_bytes for k in chain) == total
    moe_layers = {int(n.split(".")[1]) for n, _ in params if n.endswith(".w13")}
    dense_layers = {int(n.split(".")[1]) for n, _ in params if n.endswith("mlp.gate_up_proj")}
    # Six kernels per MoE layer, five per dense-MLP layer (no router), the LM head and the sampler, and the
    # embedding's rows unless the LM head reads the whole table anyway.
    assert len(chain) == 6 * len(moe_layers) + 5 * len(dense_layers) + 2 + (not cfg.tie_word_embeddings)
    assert all(0 <= k.early_read_bytes <= k.read_bytes for k in chain)
    by_name = {k.name: k for k in chain}
    assert by_name["sample"].early_read_bytes == 0  # the logits are this step's
    # Everything else is weights, or state and KV of earlier steps: all loadable before the wait.
    for kernel in chain:
        if kernel.name != "sample" and not (kernel.name.endswith(".gate_up") and int(kernel.name.split(".")[0])
                                             in moe_layers):
            assert kernel.early_read_bytes == kernel.read_bytes, kernel.name
    for layer in moe_layers:
        gate_up = by_name[f"{layer}.gate_up"]
        # Only what needs no routing loads early: the shared expert (stacked as expert E, or its own MLP).
        assert 0 < gate_up.early_read_bytes < gate_up.read_bytes
        if cfg.shared_expert_in_experts:
            assert gate_up.early_read_bytes * (touched + 1) == gate_up.read_bytes
    batch = len(contexts)
    kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * (1 if kv_fp8 else 2)
    for layer in cfg.attention_layers:
        assert by_name[f"{layer}.mixer"].write_bytes == batch * kv_token  # the new token's K and V
    for layer in cfg.gdn_layers:  # the recurrent state goes back where it came from
        mixer = by_name[f"{layer}.mixer"]
        assert mixer.write_bytes == batch * cfg.linear_num_value_heads * cfg.linear_key_head_dim * \
            cfg.linear_value_head_dim * 4


def test_chain_refuses_a_parameter_it_cannot_place():
    cfg = CONFIGS["qwen3_5_moe"]
    params = _params(cfg) + [("layers.0.mixer.extra_proj", (4, 4))]
    with pytest.raises(ValueError, match="extra_proj"):
        decode_kernel_chain(params, cfg, torch.bfloat16, [8])
