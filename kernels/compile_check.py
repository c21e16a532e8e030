"""Compile the Triton kernels for Hopper (sm_90) and Blackwell (sm_100) on a machine without a GPU, and report what
ptxas made of them.

    python -m kernels.compile_check                 # every case below, for sm_90
    python -m kernels.compile_check --cases gdn     # names containing "gdn"
    python -m kernels.compile_check --archs 90,100  # also for the B200's sm_100

Each case calls a real launcher (``gdn_prefill``, ``gated_norm_linear``, ...) on CPU tensors of the model's real
shapes, with Triton's launch replaced by a compile for the target (sm_90 with 132 SMs: an H100 / H200; sm_100 with
148: a B200; Triton builds the ``a`` variants, sm_90a / sm_100a, for these capabilities): the
arguments are specialised exactly as a launch specialises them (16-byte-aligned pointers, strides divisible
by 16), the GPU launch configuration is used (PDL on), and nothing runs. It catches what the interpreter
cannot (code that does not compile, register spills, global loads that are not 16 bytes wide) at no device
time. Per kernel: registers per thread, stack and local memory (spills), shared memory, and the global loads
in the PTX by width (vector count x bits). Needs Triton's bundled ptxas and cuobjdump (the pip package has
them); unset TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

NUM_SMS = {90: 132, 100: 148}  # H100 / H200, B200
# The launchers' modules, imported before TargetCompiler patches their launch configuration.
LAUNCHER_MODULES = ("conv1d", "gdn_chunk", "gdn_decode", "gemv", "moe", "norm", "qk_norm_rope")


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    keys = ("registers", "stack_bytes", "static_shared_bytes", "local_bytes")
    return dict(zip(keys, map(int, found.groups()), strict=True)) if found else {}


def _global_loads(ptx: str) -> str:
    widths = Counter()
    for op in re.findall(r"\bld\.global[\w.:]*", ptx):
        width = re.search(r"\.v([248])\.", op)
        bits = re.search(r"\.[bfsu](8|16|32|64)\b", op)
        widths[f"{int(width.group(1)) if width else 1}x{bits.group(1) if bits else '?'}"] += 1
    return " ".join(f"{n} {w}" for w, n in sorted(widths.items()))


class TargetCompiler:
    """Replaces ``JITFunction.run`` while active: each launch compiles for ``sm_<arch>`` and records the result."""

    def __init__(self, arch: int = 90) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.results: list[dict] = []

    def run(self, fn, *args, grid, warmup, **kwargs):
        from triton.compiler import ASTSource, compile
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=self.target, options=options.__dict__)
        names = [p.name for p in fn.params]
        consts = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1
                  and names[path[0]].isupper()}
        self.results.append({"kernel": fn.__name__, "constexprs": consts, "num_warps": options.num_warps,
                             **_resources(kernel.asm["cubin"]), "dynamic_shared_bytes": kernel.metadata.shared,
                             "global_loads": _global_loads(kernel.asm["ptx"])})
        return None

    def __enter__(self) -> TargetCompiler:
        import triton.runtime.jit as jit

        for module in LAUNCHER_MODULES:
            importlib.import_module(f"kernels.triton.{module}")
        self._saved = [(jit.JITFunction, "run", jit.JITFunction.run)]
        compiler = self

        def run(fn, *args, grid, warmup, **kwargs):
            return compiler.run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        jit.JITFunction.run = run
        # The GPU launch configuration: PDL on, the target's SM count.
        for name, module in list(sys.modules.items()):
            if name.startswith("kernels.triton") and hasattr(module, "pdl_launch_args"):
                self._saved.append((module, "pdl_launch_args", module.pdl_launch_args))
                module.pdl_launch_args = lambda device: {"PDL": True, "launch_pdl": True}
            if name.startswith("kernels.triton") and hasattr(module, "num_sms"):
                self._saved.append((module, "num_sms", module.num_sms))
                module.num_sms = lambda device: NUM_SMS[self.arch]
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)


# ---------------------------------------------------------------------------------------------------- cases


def _gdn_inputs(tokens: tuple[int, ...], hk: int, hv: int, d: int):
    packed = torch.randn(*tokens, 2 * hk * d + hv * d, dtype=torch.bfloat16)
    q, k, v = packed.split([hk * d, hk * d, hv * d], dim=-1)
    ab = torch.randn(*tokens, 2 * hv, dtype=torch.bfloat16)
    return (q.unflatten(-1, (hk, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hv, d)), ab[..., :hv], ab[..., hv:],
            torch.randn(hv), torch.randn(hv))


def gdn_decode_case(hk: int, hv: int, tokens: int, step_states: bool) -> Callable[[], None]:
    def run() -> None:
        from kernels.triton.gdn_decode import gdn_decode

        q, k, v, a, b, a_log, dt_bias = _gdn_inputs((1, tokens), hk, hv, 128)
        pool = torch.empty(4, hv, 128, 128)
        steps = torch.empty(1, tokens, hv, 128, 128) if step_states else None
        gdn_decode(q, k, v, a, b, a_log, dt_bias, pool, torch.tensor([1]), step_states=steps)
    return run


def gdn_prefill_case(hk: int, hv: int, tokens: int, **launch) -> Callable[[], None]:
    def run() -> None:
        from kernels.triton.gdn_chunk import gdn_prefill

        q, k, v, a, b, a_log, dt_bias = _gdn_inputs((tokens,), hk, hv, 128)
        pool = torch.empty(4, hv, 128, 128)
        gdn_prefill(q, k, v, a, b, a_log, dt_bias, pool, torch.tensor([1]), [0, tokens], [True],
                    [(0, tokens // 2, 3)], **launch)
    return run


def _bf16(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16)


def gated_norm_linear_397b() -> None:
    """GDN out_proj of a 397B decode step: 2048 tiles over 2 programs per SM (each normalises the row once)."""
    from kernels.triton import gemv

    w = _bf16
    gemv.gated_norm_linear(w(1, 64, 128), w(1, 64, 128), w(128), 1e-6, w(4096, 8192))


def rms_norm_linear_capped_35b() -> None:
    """The 35B GDN in_proj with its conv epilogue on a capped grid (4 programs per SM, tiles strided)."""
    from kernels.triton import gemv

    w = _bf16
    gemv.rms_norm_linear(w(1, 2048), w(1, 2048), w(2048), 1e-6, w(12352, 2048), conv_weight=w(8192, 4),
                         conv_states=w(4, 8192, 3), state_slot=torch.tensor([1]), programs_per_sm=4)


def moe_shared_last_case(hidden: int, inter: int, experts: int, top_k: int) -> Callable[[], None]:
    """The decode experts with the shared expert's weights loaded before the PDL wait (``shared_last``)."""

    def case() -> None:
        from kernels.triton import moe

        w = _bf16
        moe.fused_experts(w(1, hidden), w(experts + 1, 2 * inter, hidden), w(experts + 1, hidden, inter),
                          torch.rand(1, top_k + 1), torch.zeros(1, top_k + 1, dtype=torch.int32), shared_last=True)

    return case


def decode_chain_35b() -> None:
    """The kernels of one Qwen3.5-35B-A3B decode step (one request) other than GDN and the MoE block above:
    fused norm + projections (with the conv epilogue), out_proj with the gated norm, o_proj with the gate,
    QK-norm/RoPE storing the KV, router + top-k, the matrix-vector experts, the LM head, conv1d."""
    from kernels.triton import conv1d, gemv, moe, norm, qk_norm_rope

    w = _bf16
    x, residual, norm_w = w(1, 2048), w(1, 2048), w(2048)
    conv_states = w(4, 8192, 3)
    gemv.rms_norm_linear(x, residual, norm_w, 1e-6, w(12352, 2048), conv_weight=w(8192, 4),
                         conv_states=conv_states, state_slot=torch.tensor([1]))
    gemv.rms_norm_linear(x, residual, norm_w, 1e-6, w(9216, 2048))
    gemv.gated_norm_linear(w(1, 32, 128), w(1, 32, 128), w(128), 1e-6, w(2048, 4096))
    gemv.gated_linear(w(1, 4096), w(1, 4096), w(2048, 4096))
    gemv.linear(x, w(248320, 2048))
    qk_norm_rope.qk_norm_rope(w(1, 9216), w(256), w(256), torch.empty(4096, 64), torch.tensor([7]), 16, 2, 256,
                              1e-6, kv_cache=w(64, 2, 16, 2, 256), kv_slot_ids=torch.tensor([5]))
    weights, ids, _, h, _ = moe.norm_route_topk(x, residual, norm_w, 1e-6, w(257, 2048), 8, True,
                                                torch.zeros(1, dtype=torch.int32))
    moe.fused_experts(h, w(257, 1024, 2048), w(257, 2048, 512), torch.rand(1, 9), torch.zeros(1, 9, dtype=torch.int32))
    norm.gemma_rms_norm_residual(x, residual, norm_w, 1e-6)
    conv1d.conv1d_update(w(2, 8192), w(8192, 4), conv_states, torch.tensor([1, 2]))
    conv1d.conv1d_prefill(w(300, 8192), w(8192, 4), conv_states, torch.tensor([1, 2]), [0, 100, 300], [True, False])


def qk_norm_rope_fp8_kv_35b() -> None:
    """QK-norm/RoPE storing k and v into an fp8 KV cache (quantized with per-layer scales, saturated)."""
    from kernels.triton import qk_norm_rope

    w = _bf16
    qk_norm_rope.qk_norm_rope(w(1, 9216), w(256), w(256), torch.empty(4096, 64), torch.tensor([7]), 16, 2, 256,
                              1e-6, kv_cache=torch.empty(64, 2, 16, 2, 256, dtype=torch.float8_e4m3fn),
                              kv_slot_ids=torch.tensor([5]), k_scale=0.5, v_scale=0.25)


def batched_decode_35b(tokens: int) -> Callable[[], None]:
    """The MoE and GDN kernels of a batched decode step of Qwen3.5-35B-A3B: router top-k after cuBLAS, the pair
    alignment (many programs beyond 256 pairs), the grouped expert GEMMs and their sum, GDN decode, conv update."""
    def case() -> None:
        from kernels.triton import conv1d, moe
        from kernels.triton.gdn_decode import gdn_decode

        w = _bf16
        h = w(tokens, 2048)
        weights, ids, _ = moe.route_topk(h, w(257, 2048), None, 8, True, fused_shared_gate=True,
                                         shared_as_expert=True, ticket=torch.zeros(1, dtype=torch.int32))
        moe.fused_experts(h, w(257, 1024, 2048), w(257, 2048, 512), torch.rand(tokens, 9),
                          torch.randint(0, 257, (tokens, 9), dtype=torch.int32), shared_last=True)
        conv1d.conv1d_update(w(tokens, 8192), w(8192, 4), w(tokens + 1, 8192, 3), torch.arange(tokens))
        q, k, v, a, b, a_log, dt_bias = _gdn_inputs((tokens, 1), 16, 32, 128)
        gdn_decode(q, k, v, a, b, a_log, dt_bias, torch.empty(tokens + 1, 32, 128, 128), torch.arange(tokens))
    return case


def moe_prefill_35b(tokens: int) -> Callable[[], None]:
    """The prefill MoE's Triton kernels at a chunk of ``tokens``: the blocked alignment, gate/up with TMA weight
    tiles storing in the sorted order (the down projection is torch's grouped GEMM there), the k-sum through the
    slots."""
    def case() -> None:
        from kernels.triton import moe

        w = _bf16
        ids = torch.randint(0, 257, (tokens, 9), dtype=torch.int32)
        cfg = moe.default_moe_config(tokens, 9, 257)
        max_padded, max_blocks = moe._padded_sizes(ids.numel(), 257, cfg.block_m)
        sorted_ids, expert_ids, num_post, _, slots = moe._moe_align_torch(ids.flatten(), cfg.block_m, 257,
                                                                          max_padded, max_blocks)
        moe._moe_align_blocked(ids.flatten(), cfg.block_m, 257, max_padded, max_blocks)
        moe._grouped_gate_up(w(tokens, 2048), w(257, 1024, 2048), sorted_ids, expert_ids, num_post, cfg, 9,
                             sorted_out=True)
        y, out, res = w(max_padded, 2048), w(tokens, 2048), w(tokens, 2048)
        moe._moe_sum_kernel[(tokens, 2)](y, out, slots, torch.rand(tokens, 9), y, y, y, 2048, 0.0, TOP_K=9,
                                         BLOCK_H=1024, SLOTS=True, NORM=False, num_warps=4)
        # With the next layer's norm: one program a token.
        moe._moe_sum_kernel[(tokens, 1)](y, out, slots, torch.rand(tokens, 9), res, w(2048), w(tokens, 2048), 2048,
                                         1e-6, TOP_K=9, BLOCK_H=2048, SLOTS=True, NORM=True,
                                         num_warps=moe._NORM_SUM_WARPS)
    return case


def decode_attention_35b() -> None:
    """The split-KV paged decode attention at 35B-A3B's shape (GQA 8, head_dim 256), bf16 and fp8 pages; and the
    fused layer block (QK-norm, RoPE with 64 of 256 dims rotating, the K/V store, the gate)."""
    from kernels.triton.decode_attention import (
        DecodeAttentionScratch,
        DecodeShape,
        FusedInputs,
        decode_attention,
        decode_attention_fused,
    )

    scratch = DecodeAttentionScratch.new(8, 2, 8, 256, 32, torch.device("cpu"))
    indptr, indices = torch.zeros(9, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
    last = torch.ones(8, dtype=torch.int32)
    inputs = FusedInputs(_bf16(8, 9216), _bf16(256), _bf16(256), torch.empty(64, 64), torch.zeros(8, dtype=torch.long),
                         torch.zeros(8, dtype=torch.long), 1e-6)
    for kv in (_bf16(64, 2, 16, 2, 256), torch.empty(64, 2, 16, 2, 256, dtype=torch.float8_e4m3fn)):
        for stages in (0, 5):  # the while loop with L2 prefetches; the software-pipelined page loop
            decode_attention(_bf16(8, 16, 256), kv, indptr, indices, last, 0.0625, scratch, num_stages=stages,
                             prefetch_pages=0 if stages else 4)
            decode_attention_fused(inputs, 16, kv, indptr, indices, last, 0.0625, scratch,
                                   shape=DecodeShape(num_stages=stages, prefetch_pages=0 if stages else 4))


CASES: dict[str, Callable[[], None]] = {
    "decode_attention_35b": decode_attention_35b,
    "moe_prefill_35b_8k": moe_prefill_35b(8192),
    "batched_decode_35b_B256": batched_decode_35b(256),
    "decode_chain_35b": decode_chain_35b,
    "qk_norm_rope_fp8_kv_35b": qk_norm_rope_fp8_kv_35b,
    "gated_norm_linear_397b": gated_norm_linear_397b,
    "rms_norm_linear_capped_35b": rms_norm_linear_capped_35b,
    "moe_shared_last_35b": moe_shared_last_case(2048, 512, 256, 8),
    "moe_shared_last_397b": moe_shared_last_case(4096, 1024, 512, 10),
    "gdn_decode_397b_B1": gdn_decode_case(16, 64, 1, False),
    "gdn_decode_397b_T3_step_states": gdn_decode_case(16, 64, 3, True),
    "gdn_prefill_35b_8k": gdn_prefill_case(16, 32, 8192),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--archs", default="90", help="compute capabilities to compile for: 90, 100 or both")
    args = parser.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    if set(archs) - set(NUM_SMS):
        parser.error(f"--archs takes {sorted(NUM_SMS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles the GPU kernels")
    failed = 0
    for arch in archs:
        for name, case in CASES.items():
            if args.cases not in name:
                continue
            with TargetCompiler(arch) as compiler:
                try:
                    case()
                except Exception as exc:  # noqa: BLE001 - report every case, then fail
                    failed += 1
                    print(f"{name} sm_{arch}: FAILED {type(exc).__name__}: {str(exc)[:2000]}")
                    continue
            for r in compiler.results:
                spills = f" stack {r['stack_bytes']} B" if r.get("stack_bytes") else ""
                spills += f" SPILLS local {r['local_bytes']} B" if r.get("local_bytes") else ""
                print(f"{name:34s} sm_{arch:<3d} {r['kernel']:24s} warps {r['num_warps']} regs {r.get('registers')} "
                      f"smem {r['dynamic_shared_bytes'] / 1024:.1f} KiB{spills} | loads {r['global_loads']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
