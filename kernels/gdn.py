"""Gated delta rule (Gated DeltaNet) in plain torch: the chunked form for prefill, the recurrent form
for decode. Both take the GDN state ``[v_heads, k_dim, v_dim]`` in fp32 and return the new one.

Per token t and value head h (k-head ``h // (v_heads // k_heads)``), with q, k L2-normalised and q scaled
by ``k_dim ** -0.5``:

    S = S * exp(g_t)
    S = S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T q_t

The chunked form computes the same thing 64 tokens at a time with a UT transform (as in HF / fla).
"""

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """Expand k-heads to v-heads, move heads first, go to fp32, L2-normalise q/k and scale q."""
    num_k_heads, num_v_heads = k.shape[-2], v.shape[-2]
    if num_v_heads != num_k_heads:
        q = q.repeat_interleave(num_v_heads // num_k_heads, dim=-2)
        k = k.repeat_interleave(num_v_heads // num_k_heads, dim=-2)
    q, k, v = (t.transpose(-3, -2).float() for t in (q, k, v))  # [..., H, L, D]
    g, beta = (t.transpose(-2, -1).float() for t in (g, beta))  # [..., H, L]
    q = l2norm(q)
    k = l2norm(k)
    q = q * (q.shape[-1] ** -0.5)
    return q, k, v, g, beta


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form. ``q, k [B, L, Hk, Dk]``, ``v [B, L, Hv, Dv]``, ``g, beta [B, L, Hv]``,
    ``state [B, Hv, Dk, Dv]`` fp32 or None (zeros). Returns ``(o [B, L, Hv, Dv] in v's dtype, new state)``."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    batch, heads, seq_len, k_dim = k.shape
    v_dim = v.shape[-1]
    if state is None:
        state = torch.zeros(batch, heads, k_dim, v_dim, dtype=torch.float32, device=v.device)
    state = state.float().clone()
    out = torch.empty_like(v)
    for t in range(seq_len):
        state = state * g[:, :, t].exp()[..., None, None]
        predicted = (state * k[:, :, t, :, None]).sum(dim=-2)
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).to(out_dtype), state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form, same arguments and results as :func:`recurrent_gated_delta_rule`."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    batch, heads, seq_len, k_dim = k.shape
    v_dim = v.shape[-1]
    pad = (chunk_size - seq_len % chunk_size) % chunk_size
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    num_chunks = (seq_len + pad) // chunk_size

    v_beta = v * beta.unsqueeze(-1)
    k_beta = k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (t.reshape(batch, heads, num_chunks, chunk_size, -1) for t in (q, k, k_beta, v_beta))
    g = g.reshape(batch, heads, num_chunks, chunk_size)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)

    g_cum = g.cumsum(dim=-1)
    # decay[i, j] = prod of gates between positions j and i of a chunk (i >= j)
    decay = (g_cum.unsqueeze(-1) - g_cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    ut_system = (k_beta @ k.transpose(-1, -2)) * decay
    intra_attn = (q @ k.transpose(-1, -2)) * decay
    # Solving the unit-lower-triangular system condenses the chunk's sequential delta updates into matmuls.
    new_values = torch.linalg.solve_triangular(ut_system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(
        ut_system, k_beta * g_cum.exp().unsqueeze(-1), upper=False, unitriangular=True
    )

    if state is None:
        state = torch.zeros(batch, heads, k_dim, v_dim, dtype=torch.float32, device=v.device)
    state = state.float()
    out = torch.zeros_like(new_values)
    q = q * g_cum.exp().unsqueeze(-1)
    k = k * (g_cum[..., -1:] - g_cum).exp().unsqueeze(-1)
    chunk_decay = g_cum[..., -1].exp()[..., None, None]
    for i in range(num_chunks):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra_attn[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, -1, v_dim)[:, :, :seq_len]
    return out.transpose(1, 2).to(out_dtype), state
