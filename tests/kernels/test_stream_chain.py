"""The stream kernels of ``loadtest.bench_decode_floor`` move exactly the bytes of the decode chain they stand for."""

from __future__ import annotations

import torch

from loadtest.bench_decode_floor import StreamChain
from loadtest.model_costs import decode_kernel_chain
from services.engine.model import Qwen35ForCausalLM
from services.engine.model_config import ModelConfig
from services.engine.ops import torch_ops
from tests.hf_models import hf_config


def test_stream_kernels_move_the_chains_bytes():
    """On the GPU, or under Triton's interpreter on CPU: every kernel of a tiny chain writes its region's first
    bytes from its own read region, and the one-launch form writes the whole chain's worth."""
    cfg = ModelConfig.from_hf_dict(hf_config("qwen3_5_moe").to_dict())
    model = Qwen35ForCausalLM(cfg, torch.bfloat16, "meta", torch_ops(), page_size=16)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    chain = decode_kernel_chain(params, cfg, torch.bfloat16, [5, 40])
    streams = StreamChain(chain, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                          min_chunk=256)
    streams.src.copy_(torch.randn(streams.src.numel()).to(torch.bfloat16))
    streams.dst.fill_(float("nan"))
    streams.launch_chain(chunk=256, num_warps=1, pdl=True)
    written = torch.zeros(streams.dst.numel(), dtype=torch.bool, device=streams.dst.device)
    offsets = zip(streams.read_offsets, streams.write_offsets, streams.sum_offsets, strict=True)
    for kernel, (r, w, p) in zip(chain, offsets, strict=True):
        n = kernel.write_bytes // 2
        torch.testing.assert_close(streams.dst[w:w + n], streams.src[r:r + n], rtol=0, atol=0)
        written[w:w + n] = True
        # Every element the kernel must read was loaded: its programs' sums add up to its region's.
        programs = -(-kernel.read_bytes // 2 // 256)
        region = streams.src[r:r + kernel.read_bytes // 2].double()
        torch.testing.assert_close(streams.sums[p:p + programs].double().sum(), region.sum(), rtol=1e-4, atol=1e-2)
    assert written.any() and streams.dst[~written].isnan().all(), "nothing is written beyond each kernel's bytes"
    streams.dst.fill_(float("nan"))
    streams.launch_one(chunk=256, num_warps=1)
    total_write = streams.write_bytes // 2
    torch.testing.assert_close(streams.dst[:total_write], streams.src[:total_write], rtol=0, atol=0)
    assert streams.dst[total_write:].isnan().all()
