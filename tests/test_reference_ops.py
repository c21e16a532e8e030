"""The plain-torch ops agree with each other and with naive definitions: chunked vs recurrent delta rule,
state carried across splits, paged vs contiguous attention, grouped vs per-token experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import attention, conv1d, gdn, moe
from tests.helpers import rel_err


def _gdn_inputs(seq_len: int, k_heads=2, v_heads=4, k_dim=16, v_dim=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seq_len, k_heads, k_dim, generator=gen)
    k = torch.randn(1, seq_len, k_heads, k_dim, generator=gen)
    v = torch.randn(1, seq_len, v_heads, v_dim, generator=gen)
    g = -torch.rand(1, seq_len, v_heads, generator=gen) * 0.5  # log-decay <= 0
    beta = torch.rand(1, seq_len, v_heads, generator=gen)
    state = torch.randn(1, v_heads, k_dim, v_dim, generator=gen) * 0.1
    return q, k, v, g, beta, state


@pytest.mark.parametrize("seq_len", [1, 5, 64, 150])
def test_chunked_equals_recurrent_delta_rule(seq_len):
    q, k, v, g, beta, state = _gdn_inputs(seq_len)
    o_rec, s_rec = gdn.recurrent_gated_delta_rule(q, k, v, g, beta, state)
    o_chk, s_chk = gdn.chunk_gated_delta_rule(q, k, v, g, beta, state)
    assert rel_err(o_chk, o_rec) < 1e-5
    assert rel_err(s_chk, s_rec) < 1e-5


def test_delta_rule_state_carries_across_splits():
    q, k, v, g, beta, state = _gdn_inputs(130, seed=1)
    whole, s_whole = gdn.chunk_gated_delta_rule(q, k, v, g, beta, state)
    first, s_mid = gdn.chunk_gated_delta_rule(q[:, :77], k[:, :77], v[:, :77], g[:, :77], beta[:, :77], state)
    second, s_end = gdn.chunk_gated_delta_rule(q[:, 77:], k[:, 77:], v[:, 77:], g[:, 77:], beta[:, 77:], s_mid)
    assert rel_err(torch.cat([first, second], dim=1), whole) < 1e-5
    assert rel_err(s_end, s_whole) < 1e-5


def test_delta_rule_matches_the_definition():
    """One head, no grouping, written out from the equations in kernels/gdn.py's docstring."""
    q, k, v, g, beta, state = _gdn_inputs(20, k_heads=1, v_heads=1, seed=2)
    out, final = gdn.recurrent_gated_delta_rule(q, k, v, g, beta, state)
    s = state[0, 0].double()
    for t in range(20):
        qt = F.normalize(q[0, t, 0].double(), dim=-1, eps=0) * q.shape[-1] ** -0.5
        kt = F.normalize(k[0, t, 0].double(), dim=-1, eps=0)
        s = s * torch.exp(g[0, t, 0].double())
        s = s + torch.outer(kt, beta[0, t, 0].double() * (v[0, t, 0].double() - s.T @ kt))
        assert torch.allclose(out[0, t, 0].double(), s.T @ qt, atol=1e-4)
    assert torch.allclose(final[0, 0].double(), s, atol=1e-4)


def test_conv_prefill_split_and_decode_steps_agree():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=gen)
    weight = torch.randn(12, 4, generator=gen)
    whole, state_whole = conv1d.causal_conv1d_prefill(x, weight, None)
    first, state = conv1d.causal_conv1d_prefill(x[:17], weight, None)
    second, state2 = conv1d.causal_conv1d_prefill(x[17:], weight, state)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-6)
    assert torch.allclose(state2, state_whole)
    # decode: token by token through the update path
    states = state.clone()[None]
    steps = [conv1d.causal_conv1d_update(x[t][None], weight, states)[0] for t in range(17, 40)]
    assert torch.allclose(torch.stack(steps), second, atol=1e-6)
    assert torch.allclose(states[0], state_whole)


def test_paged_attention_equals_contiguous_causal_attention():
    gen = torch.Generator().manual_seed(4)
    page_size, heads, kv_heads, dim = 4, 4, 2, 8
    cache = torch.randn(20, 2, page_size, kv_heads, dim, generator=gen)
    lens = [(5, 13), (1, 9), (7, 7)]  # (query_len, kv_len)
    tables, qs, expected = [], [], []
    free_pages = torch.randperm(20, generator=gen).tolist()
    for q_len, kv_len in lens:
        pages = [free_pages.pop() for _ in range(-(-kv_len // page_size))]
        tables.append(torch.tensor(pages))
        k, v = attention.gather_kv(cache, torch.tensor(pages), kv_len)
        q = torch.randn(q_len, heads, dim, generator=gen)
        qs.append(q)
        # dense reference: full scores, causal with the queries at the end of the sequence
        kk = k.repeat_interleave(2, dim=1)
        vv = v.repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, kk) * dim**-0.5
        pos = torch.arange(kv_len - q_len, kv_len)
        scores = scores.masked_fill(torch.arange(kv_len)[None, None, :] > pos[None, :, None], float("-inf"))
        expected.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
    out = attention.paged_attention(
        torch.cat(qs), cache, tables, [q for q, _ in lens], [kv for _, kv in lens], dim**-0.5
    )
    assert torch.allclose(out, torch.cat(expected), atol=1e-5)


def test_write_kv_lands_in_the_right_page_slots():
    cache = torch.zeros(6, 2, 4, 1, 2)
    k = torch.arange(10, dtype=torch.float32).view(5, 1, 2)
    slots = torch.tensor([20, 21, 3, 4, 11])  # page 5 offsets 0-1, page 0 offset 3, page 1 offset 0, page 2 offset 3
    attention.write_kv(cache, k, -k, slots)
    assert torch.equal(cache[5, 0, 0, 0], k[0, 0]) and torch.equal(cache[5, 1, 1, 0], -k[1, 0])
    assert torch.equal(cache[0, 0, 3, 0], k[2, 0]) and torch.equal(cache[2, 0, 3, 0], k[4, 0])


def test_grouped_experts_equal_per_token_loop():
    gen = torch.Generator().manual_seed(5)
    tokens, hidden, inter, experts, top_k = 9, 16, 8, 6, 2
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.3
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.3
    weights, ids = moe.topk_softmax(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(tokens))
    out = moe.fused_experts(x, w13, w2, weights, ids)
    for t in range(tokens):
        want = sum(
            weights[t, j] * (w2[e] @ (F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])))
            for j, e in enumerate(ids[t].tolist())
        )
        assert torch.allclose(out[t], want, atol=1e-5)
