"""The decode-sized dense projection kernel (kernels.triton.gemv) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import conv1d as conv_ref
from kernels import norm as norm_ref
from kernels.triton import gemv as gemv_tk
from kernels.triton.pdl import pdl_launch_args

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
# An explicit tile for the fused launchers: one row per single-warp program.
_ONE_ROW_TILE = gemv_tk.GemvTile(block_n=1, block_k=0, num_warps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,k,tile", [
    (1, 2048, 4096, None),  # GDN out_proj / attention o_proj of 35B-A3B
    (3, 257, 2048, gemv_tk.GemvTile(block_n=2, block_k=256)),  # router rows, three tokens, narrow tile
    (4, 75, 200, gemv_tk.GemvTile(block_n=8, block_k=64)),  # N and K both ragged against the tile
    (2, 33, 16, gemv_tk.GemvTile(block_n=4, block_k=128)),  # K shorter than one K step
    (1, 101, 300, gemv_tk.GemvTile(block_n=2, block_k=0)),  # the whole K as one tile (the GPU default)
    (4, 9, 72, gemv_tk.GemvTile(block_n=8, block_k=0)),
])
def test_gemv_matches_linear(dtype, rows, cols, k, tile):
    gen = torch.Generator().manual_seed(rows * cols + k)
    weight_rows = torch.randn(cols, k + 8, generator=gen)[:, 3:3 + k]  # row stride != K
    weight = (weight_rows * k**-0.5).to(dtype).to(DEVICE)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(DEVICE)
    got = gemv_tk.gemv(x, weight, tile=tile)
    want = F.linear(x.float(), weight.float())
    assert got.shape == (rows, cols) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


def test_linear_dispatch():
    """Decode-sized inputs take the kernel, everything else F.linear; both agree with F.linear."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 64, generator=gen).to(DEVICE)
    bias = torch.randn(40, generator=gen).to(DEVICE)
    for rows in (1, 4, 5, 9):
        x = torch.randn(rows, 64, generator=gen).to(DEVICE)
        torch.testing.assert_close(gemv_tk.linear(x, weight), F.linear(x, weight), **TOL[torch.float32])
        torch.testing.assert_close(gemv_tk.linear(x, weight, bias), F.linear(x, weight, bias), **TOL[torch.float32])
    x3 = torch.randn(2, 3, 64, generator=gen).to(DEVICE)
    torch.testing.assert_close(gemv_tk.linear(x3, weight), F.linear(x3, weight), **TOL[torch.float32])


def test_gemv_argument_checks():
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="expected x"):
        gemv_tk.gemv(torch.zeros(1, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match="at most"):
        gemv_tk.gemv(torch.zeros(gemv_tk.MAX_ROWS + 1, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype"):
        gemv_tk.gemv(torch.zeros(1, 16, device=DEVICE, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="unit stride"):
        gemv_tk.gemv(torch.zeros(16, 2, device=DEVICE)[:, :1].t(), w)
    with pytest.raises(ValueError, match="powers of two"):
        gemv_tk.gemv(torch.zeros(1, 16, device=DEVICE), w, tile=gemv_tk.GemvTile(block_n=3))
    wide = torch.zeros(2, 16384, device=DEVICE)
    with pytest.raises(ValueError, match="one tile"):
        gemv_tk.gemv(torch.zeros(1, 16384, device=DEVICE), wide, tile=gemv_tk.GemvTile(block_k=0))


def test_pdl_launch_args(monkeypatch):
    """Programmatic dependent launch: on for CUDA devices of sm_90+, off elsewhere and with BATON_PDL=0."""
    assert pdl_launch_args(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available():
        on = torch.cuda.get_device_capability()[0] >= 9
        want = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
        assert pdl_launch_args(torch.device("cuda")) == want
        monkeypatch.setenv("BATON_PDL", "0")
        assert pdl_launch_args(torch.device("cuda")) == {"PDL": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,with_residual,programs_per_sm,tile", [
    (2048, 300, True, 0, None), (72, 33, True, 0, None), (72, 33, False, 0, None),
    (72, 300, True, 1, None),  # a capped grid: several column tiles per program, a partial last one
    (2048, 37, True, 0, _ONE_ROW_TILE),  # an explicit tile
])
def test_rms_norm_linear(dtype, k, n, with_residual, programs_per_sm, tile):
    """Residual add + Gemma RMSNorm + projection in one kernel equals the three reference steps; the new
    residual (and the normed row, when asked) come out exactly as the norm kernel writes them."""
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE) if with_residual else None
    norm_weight = (torch.randn(k, generator=gen) * 0.1).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(DEVICE)
    y, new_res, normed = gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, weight, write_normed=True,
                                                 programs_per_sm=programs_per_sm, tile=tile)
    want_h, want_res = norm_ref.gemma_rms_norm_residual(x, residual, norm_weight, 1e-6)
    torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(normed, want_h, **TOL[dtype])
    torch.testing.assert_close(y.float(), F.linear(want_h.float(), weight.float()), **TOL[dtype])
    if not with_residual:
        assert new_res is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim,n,programs_per_sm,tile", [
    (32, 128, 200, 2, None),
    (3, 40, 17, 2, None),
    (3, 40, 300, 1, None),  # more column tiles than programs: each program takes several (a partial last one)
    (64, 128, 4100, 2, None),  # Qwen3.5-397B's out_proj rows (8192 wide) and several tiles per program
    (32, 128, 37, 0, _ONE_ROW_TILE),  # an explicit tile
])
def test_gated_norm_linear(dtype, heads, head_dim, n, programs_per_sm, tile):
    """GDN output: per-head gated RMSNorm then out_proj in one kernel, z a strided view as in the model; the
    row normalised once per program for all of its column tiles."""
    gen = torch.Generator().manual_seed(heads * head_dim + n)
    core = torch.randn(1, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    projected = torch.randn(1, 2 * heads * head_dim + 5, generator=gen).to(dtype).to(DEVICE)
    z = projected[:, 5:5 + heads * head_dim].view(1, heads, head_dim)
    norm_weight = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE)
    weight = (torch.randn(n, heads * head_dim, generator=gen) * (heads * head_dim) ** -0.5).to(dtype).to(DEVICE)
    y = gemv_tk.gated_norm_linear(core, z, norm_weight, 1e-6, weight, programs_per_sm=programs_per_sm, tile=tile)
    gated = norm_ref.gated_rms_norm(core, z, norm_weight, 1e-6).flatten(1)
    assert y.shape == (1, n)
    torch.testing.assert_close(y.float(), F.linear(gated.float(), weight.float()), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,conv_dim,taps,programs_per_sm", [
    (2048, 300, 256, 4, 0), (72, 37, 21, 4, 0), (40, 9, 9, 2, 0),
    (40, 400, 300, 4, 1),  # a capped grid: conv columns in several tiles of each program
])
def test_rms_norm_linear_with_conv(dtype, k, n, conv_dim, taps, programs_per_sm):
    """The GDN in_proj with the conv update in its epilogue: the first conv_dim columns are the reference
    conv1d update of the (rounded) projection, the rest the plain projection; only the given state slot
    changes, to exactly the reference's new state."""
    gen = torch.Generator().manual_seed(k + n + conv_dim)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    norm_weight = (torch.randn(k, generator=gen) * 0.1).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(DEVICE)
    conv_weight = (torch.randn(conv_dim, taps, generator=gen) * 0.5).to(dtype).to(DEVICE)
    pool = torch.randn(3, conv_dim, taps - 1, generator=gen).to(dtype).to(DEVICE)
    states = pool.clone()
    slot = torch.tensor([1], device=DEVICE)
    y, new_res, _ = gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, weight, conv_weight=conv_weight,
                                            conv_states=states, state_slot=slot, programs_per_sm=programs_per_sm)
    # Reference: the fused norm + projection without the conv (checked above), then the conv update.
    plain, want_res, _ = gemv_tk.rms_norm_linear(x, residual, norm_weight, 1e-6, weight)
    want_states = pool[1:2].clone()
    want_conv = conv_ref.causal_conv1d_update(plain[:, :conv_dim], conv_weight.float(), want_states)
    torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(y[:, conv_dim:], plain[:, conv_dim:], rtol=0, atol=0)
    torch.testing.assert_close(y[:, :conv_dim].float(), want_conv.float(), **TOL[dtype])
    torch.testing.assert_close(states[1:2], want_states, rtol=0, atol=0)
    assert torch.equal(states[0], pool[0]) and torch.equal(states[2], pool[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,tile", [(4096, 200, None), (72, 33, None), (4096, 37, _ONE_ROW_TILE)])
def test_gated_linear(dtype, k, n, tile):
    """The attention output gate multiplied in o_proj's prologue equals the multiply then the projection."""
    gen = torch.Generator().manual_seed(k * n)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    gate = torch.rand(1, k, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(DEVICE)
    y = gemv_tk.gated_linear(x, gate, weight, tile=tile)
    assert y.shape == (1, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), F.linear((x * gate).float(), weight.float()), **TOL[dtype])


def test_fused_prologue_argument_checks():
    x = torch.zeros(2, 16, device=DEVICE)
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one|1, K"):
        gemv_tk.rms_norm_linear(x, None, torch.zeros(16, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        gemv_tk.rms_norm_linear(x[:1], x, torch.zeros(16, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="heads"):
        gemv_tk.gated_norm_linear(torch.zeros(2, 2, 8, device=DEVICE), torch.zeros(2, 2, 8, device=DEVICE),
                                  torch.zeros(8, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="conv needs"):
        gemv_tk.rms_norm_linear(x[:1], None, torch.zeros(16, device=DEVICE), 1e-6, w,
                                conv_weight=torch.zeros(12, 4, device=DEVICE),
                                conv_states=torch.zeros(2, 12, 3, device=DEVICE), state_slot=torch.zeros(1))
    with pytest.raises(ValueError, match="gated_linear"):
        gemv_tk.gated_linear(x, x, w)
    with pytest.raises(ValueError, match="powers of two"):
        gemv_tk.gated_linear(x[:1], x[:1], w, tile=gemv_tk.GemvTile(block_n=3))
