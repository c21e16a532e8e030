"""What a forward pass of the model must cost at least: bytes through device memory and FLOPs.

The benchmarks divide these by the device-to-device copy bandwidth and the bf16 GEMM rate measured in the
same run; the slower of the two is the roofline a step is compared against. No tensors here: only the
parameter shapes and the model config.

Decode step of B requests (``decode_step_bytes``): every weight the step reads once -- the dense parts (GDN and
attention projections, norms, the router, the LM head), one embedding row per request, and of each MoE layer's
stacked experts only those some request was routed to (plus the shared expert, stacked as expert E) --, the KV
of every request's context (plus the new token's, written; one byte per element in an fp8 cache), each
request's GDN conv and SSM states read and written back, and the logits written and read once by the sampler.

FLOPs (``decode_step_flops``, ``prefill_flops``): 2 per multiply-add of every projection a token goes through
(its k experts and the shared one), the attention's QK^T and PV over the context (causal within a prompt), and
the gated delta rule's recurrent form per token and value head (k^T S, the rank-1 update, q^T S: 3 d_k x d_v
multiply-adds). The LM head runs once per request (decode) or once per prompt (its last token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from services.engine.model_config import ModelConfig


def _is_expert_stack(name: str) -> bool:
    return name.endswith(".w13") or name.endswith(".w2")


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def expert_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """One expert's gate/up and down weights."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * dtype.itemsize


def expected_experts_touched(cfg: ModelConfig, batch: int) -> float:
    """Distinct routed experts of one MoE layer that ``batch`` tokens pick, under uniform independent routing:
    ``E (1 - (1 - k/E)^B)``."""
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch) if e else 0


def decode_step_bytes(
    params: Sequence[tuple[str, tuple[int, ...]]], cfg: ModelConfig, dtype: torch.dtype, contexts: Sequence[int],
    experts_touched: Sequence[int] | None = None, kv_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Fewest bytes one decode step of ``len(contexts)`` requests moves. ``params``: (name, shape) of every
    parameter (``[(n, tuple(p.shape)) for n, p in model.named_parameters()]``); ``contexts``: each request's
    tokens before the step; ``experts_touched``: distinct routed experts per MoE layer this step (None: the
    expectation under uniform independent routing, ``E (1 - (1 - k/E)^B)``); ``kv_dtype``: the KV cache's
    (default ``dtype``; an fp8 cache is one byte per element, its per-layer scales are kernel arguments)."""
    batch = len(contexts)
    itemsize = dtype.itemsize
    moe_layers = [name for name, _ in params if name.endswith(".w13")]
    if experts_touched is None:
        experts_touched = [expected_experts_touched(cfg, batch)] * len(moe_layers)
    if len(experts_touched) != len(moe_layers):
        raise ValueError(f"experts_touched has {len(experts_touched)} entries for {len(moe_layers)} MoE layers")
    dense = experts = 0
    for name, shape in params:
        if _is_expert_stack(name):
            continue
        nbytes = _numel(shape) * (4 if name.endswith(("A_log", "dt_bias")) else itemsize)
        if name == "embed_tokens" and not cfg.tie_word_embeddings:
            nbytes = min(batch, shape[0]) * shape[1] * itemsize  # the rows of the step's tokens
        dense += nbytes
    shared = 1 if cfg.shared_expert_in_experts else 0
    per_expert = expert_bytes(cfg, dtype)
    experts = int(sum((touched + shared) * per_expert for touched in experts_touched))
    num_gdn = len(cfg.gdn_layers)
    ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    conv = cfg.gdn_conv_dim * (cfg.linear_conv_kernel_dim - 1) * itemsize
    state = batch * 2 * num_gdn * (ssm + conv)  # read and written back
    kv_itemsize = (kv_dtype or dtype).itemsize
    kv_per_token = len(cfg.attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * kv_itemsize
    kv = sum(c + 1 for c in contexts) * kv_per_token
    logits = batch * cfg.vocab_size * itemsize * 2  # written by the LM head, read by the sampler
    total = dense + experts + state + kv + logits
    return {"dense_weights": dense, "experts": experts, "gdn_state": state, "kv": kv, "logits": logits, "total": total}


@dataclass(frozen=True)
class ChainKernel:
    """One kernel of the shortest chain a decode step can run as, one kernel per grid-wide dependency: the bytes
    it must read and write through device memory, and how many of the read bytes it may load before the kernel
    before it completes (under programmatic dependent launch: weights and what earlier steps wrote; not what
    depends on this step's data, such as the routed experts' addresses)."""

    name: str
    read_bytes: int
    write_bytes: int
    early_read_bytes: int


# Which kernel of a decoder layer each parameter belongs to (the last name component, or the last two).
_LAYER_KERNEL_OF_PARAM = {
    "input_layernorm.weight": "in", "mixer.in_proj": "in", "mixer.conv_weight": "in", "mixer.qkv_proj": "in",
    "mixer.A_log": "mixer", "mixer.dt_bias": "mixer", "q_norm.weight": "mixer", "k_norm.weight": "mixer",
    "mixer.norm_weight": "out", "mixer.out_proj": "out", "mixer.o_proj": "out",
    "post_attention_layernorm.weight": "router", "mlp.router": "router",
    "mlp.w13": "gate_up", "shared_expert.gate_up_proj": "gate_up", "mlp.gate_up_proj": "gate_up",
    "mlp.w2": "down", "shared_expert.down_proj": "down", "mlp.down_proj": "down",
}
_LAYER_KERNELS = ("in", "mixer", "out", "router", "gate_up", "down")


def decode_kernel_chain(
    params: Sequence[tuple[str, tuple[int, ...]]], cfg: ModelConfig, dtype: torch.dtype, contexts: Sequence[int],
    experts_touched: Sequence[int] | None = None, kv_dtype: torch.dtype | None = None,
) -> list[ChainKernel]:
    """The decode step of ``decode_step_bytes`` (same arguments, the same bytes in total) as the fewest
    kernels a kernel-per-operation design needs: a new kernel wherever an operation needs the whole output of
    the one before it. Per layer: the input projection (its norm needs the whole hidden vector; the GDN conv
    state is updated in its epilogue), the mixer (a head's recurrence or attention needs the whole head's
    q/k/v, written by many projection programs), the output projection (the whole mixer output), the router
    (the whole hidden vector after the residual), the experts' gate/up (the routing: their weights' addresses
    are known only then, except the shared expert's), the experts' down projection (the whole intermediate
    activation; its experts are known by then, so their weights count as loadable early, which flatters the
    chain). Then the LM head and the sampler (every logit). The embedding's rows start the chain."""
    batch = len(contexts)
    itemsize = dtype.itemsize
    totals = decode_step_bytes(params, cfg, dtype, contexts, experts_touched, kv_dtype)
    num_moe = sum(name.endswith(".w13") for name, _ in params)
    if experts_touched is None:
        experts_touched = [expected_experts_touched(cfg, batch)] * num_moe
    shared = 1 if cfg.shared_expert_in_experts else 0
    layers: list[dict[str, list[int]]] = [
        {kernel: [0, 0, 0] for kernel in _LAYER_KERNELS} for _ in range(cfg.num_hidden_layers)]  # read, write, early
    moe_layers = sorted({int(name.split(".")[1]) for name, _ in params if name.endswith(".w13")})
    head_read = embed_read = 0
    for name, shape in params:
        if not name.startswith("layers."):
            nbytes = _numel(shape) * itemsize
            if name == "embed_tokens" and not cfg.tie_word_embeddings:
                embed_read = min(batch, shape[0]) * shape[1] * itemsize
            elif name in ("embed_tokens", "lm_head", "norm.weight"):  # a tied table is read whole as the LM head
                head_read += nbytes
            else:
                raise ValueError(f"no kernel of the decode chain reads {name}")
            continue
        layer = int(name.split(".")[1])
        kernel = _LAYER_KERNEL_OF_PARAM.get(".".join(name.split(".")[-2:]))
        if kernel is None:
            raise ValueError(f"no kernel of the decode chain reads {name}")
        if _is_expert_stack(name):
            touched = experts_touched[moe_layers.index(layer)]
            per_expert = _numel(shape[1:]) * itemsize
            nbytes = round((touched + shared) * per_expert)
            early = shared * per_expert if kernel == "gate_up" else nbytes
        else:
            nbytes = _numel(shape) * (4 if name.endswith(("A_log", "dt_bias")) else itemsize)
            early = nbytes
        entry = layers[layer][kernel]
        entry[0] += nbytes
        entry[2] += early
    for i, kernels in enumerate(layers):
        if i not in moe_layers:  # a dense MLP: its gate/up projection applies the post-attention norm itself
            kernels["gate_up"] = [a + b for a, b in zip(kernels.pop("router"), kernels["gate_up"], strict=True)]
    ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    conv = cfg.gdn_conv_dim * (cfg.linear_conv_kernel_dim - 1) * itemsize
    kv_layer_token = 2 * cfg.num_key_value_heads * cfg.head_dim * (kv_dtype or dtype).itemsize
    for i in cfg.gdn_layers:  # each request's states: read (before the wait: an earlier step wrote them), written
        for kernel, nbytes in (("in", batch * conv), ("mixer", batch * ssm)):
            entry = layers[i][kernel]
            entry[0] += nbytes
            entry[1] += nbytes
            entry[2] += nbytes
    for i in cfg.attention_layers:  # the context's KV (earlier steps'), and the new token's written
        entry = layers[i]["mixer"]
        entry[0] += sum(contexts) * kv_layer_token
        entry[1] += batch * kv_layer_token
        entry[2] += sum(contexts) * kv_layer_token
    logits = batch * cfg.vocab_size * itemsize
    chain = [ChainKernel("embed", embed_read, 0, embed_read)] if embed_read else []
    for i, kernels in enumerate(layers):
        chain += [ChainKernel(f"{i}.{k}", r, w, e) for k, (r, w, e) in kernels.items() if r or w]
    chain += [ChainKernel("lm_head", head_read, logits, head_read), ChainKernel("sample", logits, 0, 0)]
    moved = sum(k.read_bytes + k.write_bytes for k in chain)
    if abs(moved - totals["total"]) > cfg.num_hidden_layers:  # expected expert counts round per layer
        raise AssertionError(f"decode chain moves {moved} bytes, decode_step_bytes counts {totals['total']}")
    return chain


def _linear_macs_per_token(params: Sequence[tuple[str, tuple[int, ...]]], cfg: ModelConfig) -> int:
    """Multiply-adds of one token through every projection except the LM head (k routed experts + shared)."""
    macs = 0
    for name, shape in params:
        if len(shape) < 2 or name in ("embed_tokens", "lm_head") or name.endswith("conv_weight"):
            continue
        if _is_expert_stack(name):
            per_expert = _numel(shape[1:])
            active = cfg.num_experts_per_tok + (1 if cfg.shared_expert_in_experts else 0)
            macs += active * per_expert
        else:
            macs += _numel(shape)
    return macs


def _recurrent_macs_per_token(cfg: ModelConfig) -> int:
    per_layer = cfg.linear_num_value_heads * 3 * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    conv = cfg.gdn_conv_dim * cfg.linear_conv_kernel_dim
    return len(cfg.gdn_layers) * (per_layer + conv)


def decode_step_flops(params: Sequence[tuple[str, tuple[int, ...]]], cfg: ModelConfig, contexts: Sequence[int]) -> int:
    batch = len(contexts)
    per_token = _linear_macs_per_token(params, cfg) + _recurrent_macs_per_token(cfg)
    lm_head = cfg.vocab_size * cfg.hidden_size
    # QK^T and PV: 2 x heads x head_dim multiply-adds per context token, per attention layer.
    attention = sum(c + 1 for c in contexts) * 2 * cfg.num_attention_heads * cfg.head_dim * len(cfg.attention_layers)
    return 2 * (batch * (per_token + lm_head) + attention)


def prefill_flops(params: Sequence[tuple[str, tuple[int, ...]]], cfg: ModelConfig, length: int) -> int:
    """One prompt of ``length`` tokens from an empty cache, logits of its last token only."""
    per_token = _linear_macs_per_token(params, cfg) + _recurrent_macs_per_token(cfg)
    lm_head = cfg.vocab_size * cfg.hidden_size
    # Causal: token i attends to i + 1 keys, sum over i is L (L + 1) / 2.
    attention = length * (length + 1) // 2 * 2 * cfg.num_attention_heads * cfg.head_dim * len(cfg.attention_layers)
    return 2 * (length * per_token + lm_head + attention)
