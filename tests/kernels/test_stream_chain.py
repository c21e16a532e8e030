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
    written = 0
    for kernel, r, w in zip(chain, streams.read_offsets, streams.write_offsets, strict=True):
        n = kernel.write_bytes // 2
        torch.testing.assert_close(streams.dst[w:w + n], streams.src[r:r + n], rtol=0, atol=0)
        written += n
    last = chain[-1]
    programs = -(-last.read_bytes // 2 // 256)
    region = streams.src[streams.read_offsets[-1]:streams.read_offsets[-1] + last.read_bytes // 2].float()
    torch.testing.assert_close(streams.sums[:programs].sum(), region.sum(), rtol=1e-5, atol=1e-3)
    assert written > 0
    streams.dst.fill_(float("nan"))
    streams.launch_one(chunk=256, num_warps=1)
    total_write = streams.write_bytes // 2
    torch.testing.assert_close(streams.dst[:total_write], streams.src[:total_write], rtol=0, atol=0)
