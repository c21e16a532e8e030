"""How close to the HBM roofline a decode step can get as a chain of kernels, whatever the kernels compute.

    python -m loadtest.bench_decode_floor --model qwen3.5-35b-a3b --cases 1x1024,1x32768,1x131072,8x4096 \\
        --engine loadtest/results/decode_auto_h200_35b-a3b.json,loadtest/results/batch_decode_h200.json \\
        --out decode_floor.json

The decode step's roofline (``loadtest.model_costs.decode_step_bytes`` over the copy bandwidth) assumes its bytes
stream as one copy. A step is a chain of dependent operations, though, and a kernel per operation pays its ramp-up
and its predecessor's tail at every grid-wide dependency. ``model_costs.decode_kernel_chain`` lists the fewest
kernels the step needs (six per layer, five for a dense MLP, the LM head, the sampler; and the embedding's rows for
an untied table, a kernel of its own as in the engine) with the bytes each must read and write, and how many of them
it may load before its predecessor completes (weights, states and KV of earlier steps; not the routed experts'
weights, whose addresses come from the router). Here every such kernel is replaced by one that only streams its
bytes: each program loads its chunk (before ``gdc_wait`` where allowed, as the engine's kernels do under
programmatic dependent launch), stores what it must write, and sums what it loaded so that the loads are kept. The chain
of these runs in a CUDA graph with PDL on, for a few chunk sizes and warp counts; its best time is a measured floor
for a kernel-per-operation engine on this GPU (with these plain loads: a cleverer stream could lower it a little),
and its fraction of the roofline that engine's ceiling. The same bytes in one launch and the chain without PDL are
timed alongside; ``--by-kind`` also times each kind of kernel alone (all the step's GDN input projections as one
chain, and so on), to set against the engine's per-kernel profile (``loadtest.profile_decode``).

``--engine`` takes result files of ``bench_decode`` and ``bench_batch_decode`` and puts the engine's measured
fraction of the roofline (their own run's copy bandwidth) next to the floor's for the same batch and context.
Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels.bench_util import alternating_graph_us, grouped_bar_chart, measure_copy_bandwidth
from kernels.triton.pdl import pdl_launch_args, pdl_trigger, pdl_wait
from services.engine.model import Qwen35ForCausalLM
from services.engine.ops import torch_ops
from services.engine.presets import preset_config

from .model_costs import ChainKernel, decode_kernel_chain, decode_step_bytes

log = logging.getLogger("bench_decode_floor")

# Regions of the arena start on this many bytes: full, aligned lines for every program.
_ALIGN = 256


@triton.jit
def _stream_kernel(src_ptr, dst_ptr, sums_ptr, n_read, n_write, early_programs, CHUNK: tl.constexpr,
                   PDL: tl.constexpr):
    """Program p loads elements [p * CHUNK, (p + 1) * CHUNK) of ``src`` (the first ``early_programs`` before
    waiting for the previous kernel; a program straddling the boundary loads all of its chunk early, which
    flatters the floor by at most a chunk a kernel), stores those below ``n_write`` to ``dst`` and the sum of
    all it loaded to ``sums[p]``, so that the compiler keeps every load."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    pdl_trigger(PDL)
    if pid < early_programs:
        x = tl.load(src_ptr + offs, mask=offs < n_read, other=0.0, eviction_policy="evict_first")
        pdl_wait(PDL)
    else:
        pdl_wait(PDL)
        x = tl.load(src_ptr + offs, mask=offs < n_read, other=0.0, eviction_policy="evict_first")
    tl.store(dst_ptr + offs, x, mask=offs < n_write)
    tl.store(sums_ptr + pid, tl.sum(x.to(tl.float32)))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class StreamChain:
    """The arena and launches of one decode chain: kernel i reads its own region of ``src`` and writes its own
    region of ``dst`` (bf16 elements), so nothing is read twice and L2 holds none of it between kernels. A
    kernel may write at most what it reads (a stream kernel stores what it loaded): a chain of contexts of under
    about a token, whose attention writes more KV than it reads, is refused."""

    def __init__(self, chain: list[ChainKernel], device: torch.device, min_chunk: int) -> None:
        for kernel in chain:
            if kernel.write_bytes > kernel.read_bytes or kernel.early_read_bytes > kernel.read_bytes:
                raise ValueError(f"{kernel.name}: a stream kernel writes and loads early at most what it reads")
        self.chain = chain
        self.read_offsets, self.write_offsets, self.sum_offsets = [], [], []
        read_end = write_end = sums_end = 0
        for kernel in chain:
            self.read_offsets.append(read_end // 2)
            self.write_offsets.append(write_end // 2)
            self.sum_offsets.append(sums_end)
            read_end += _aligned(kernel.read_bytes)
            write_end += _aligned(kernel.write_bytes)
            sums_end += triton.cdiv(kernel.read_bytes // 2, min_chunk)
        # Uninitialised memory: the bytes move whatever they hold.
        self.src = torch.empty(read_end // 2, dtype=torch.bfloat16, device=device)
        self.dst = torch.empty(max(write_end, _ALIGN) // 2, dtype=torch.bfloat16, device=device)
        # One sums buffer for every launch shape, allocated once (a graph captured earlier must not be left
        # holding a buffer that a later, larger launch replaced: capturing a graph empties torch's cache), with
        # each kernel's programs at their own offset.
        self.min_chunk = min_chunk
        self.sums = torch.empty(max(sums_end, triton.cdiv(self.src.numel(), min_chunk)), dtype=torch.float32,
                                device=device)
        self.device = device

    @property
    def read_bytes(self) -> int:
        return sum(k.read_bytes for k in self.chain)

    @property
    def write_bytes(self) -> int:
        return sum(k.write_bytes for k in self.chain)

    def _check_chunk(self, chunk: int) -> None:
        if chunk < self.min_chunk:
            raise ValueError(f"chunk {chunk} is below the {self.min_chunk} the sums buffer was sized for")

    def launch_chain(self, chunk: int, num_warps: int, pdl: bool) -> None:
        """Every kernel of the chain, in order (``chunk`` bf16 elements per program)."""
        self._check_chunk(chunk)
        launch = pdl_launch_args(self.device) if pdl else {"PDL": False}
        programs = [triton.cdiv(k.read_bytes // 2, chunk) for k in self.chain]
        offsets = zip(self.read_offsets, self.write_offsets, self.sum_offsets, strict=True)
        for kernel, grid, (r, w, p) in zip(self.chain, programs, offsets, strict=True):
            _stream_kernel[(grid,)](
                self.src[r:], self.dst[w:], self.sums[p:], kernel.read_bytes // 2, kernel.write_bytes // 2,
                triton.cdiv(kernel.early_read_bytes // 2, chunk), CHUNK=chunk, num_warps=num_warps, **launch,
            )

    def launch_one(self, chunk: int, num_warps: int) -> None:
        """All the chain's bytes in one launch: the whole arena read, the same number of bytes written."""
        self._check_chunk(chunk)
        n_read = self.src.numel()
        programs = triton.cdiv(n_read, chunk)
        _stream_kernel[(programs,)](self.src, self.dst, self.sums, n_read, self.write_bytes // 2,
                                    programs, CHUNK=chunk, num_warps=num_warps, PDL=False)


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"1x1024,8x4096"`` -> [(batch, context), ...]."""
    cases = []
    for item in text.split(","):
        batch, _, context = item.partition("x")
        if not context:
            raise ValueError(f"case {item!r} is not BATCHxCONTEXT")
        cases.append((int(batch), int(context)))
    return cases


def engine_fractions(paths: list[Path]) -> dict[tuple[int, int], float]:
    """(batch, context) -> the engine's fraction of its roofline, from bench_decode (one request) and
    bench_batch_decode result files."""
    found = {}
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            if run.get("fraction_of_roofline") is not None:
                found[(run.get("batch", 1), run["context"])] = run["fraction_of_roofline"]
    return found


def kernel_kind(kernel: ChainKernel, attention_layers: set[int]) -> str:
    """What a chain kernel stands for, across layers: ``gdn.in``, ``attention.mixer``, ``gate_up``, ``lm_head``..."""
    layer, dot, part = kernel.name.partition(".")
    if not dot:
        return kernel.name
    if part in ("in", "mixer", "out"):
        return f"{'attention' if int(layer) in attention_layers else 'gdn'}.{part}"
    return part


def time_by_kind(chain: list[ChainKernel], attention_layers: set[int], chunk: int, warps: int,
                 device: torch.device) -> dict[str, dict]:
    """Each kind of kernel alone, as a chain of all the step's kernels of that kind (PDL, one launch shape):
    microseconds per kernel and its bytes' time at the copy bandwidth are compared by the caller."""
    kinds: dict[str, list[ChainKernel]] = {}
    for kernel in chain:
        kinds.setdefault(kernel_kind(kernel, attention_layers), []).append(kernel)
    out = {}
    for kind, kernels in kinds.items():
        streams = StreamChain(kernels, device, min_chunk=chunk)
        us = alternating_graph_us({kind: lambda s=streams: s.launch_chain(chunk, warps, pdl=True)},
                                  rounds=5, replays=5)[kind]
        out[kind] = {"kernels": len(kernels), "us_per_kernel": us / len(kernels),
                     "bytes_per_kernel": sum(k.read_bytes + k.write_bytes for k in kernels) / len(kernels)}
        del streams
    return out


def bench_case(params: list, cfg, batch: int, context: int, bandwidth: float, configs: list[tuple[int, int]],
               device: torch.device, by_kind: bool = False) -> dict:
    chain = decode_kernel_chain(params, cfg, torch.bfloat16, [context] * batch)
    total = decode_step_bytes(params, cfg, torch.bfloat16, [context] * batch)["total"]
    streams = StreamChain(chain, device, min_chunk=min(c for c, _ in configs))
    roofline_us = total / bandwidth * 1e6
    calls = {f"chain_pdl_{c}x{w}": (lambda c=c, w=w: streams.launch_chain(c, w, pdl=True)) for c, w in configs}
    times = alternating_graph_us(calls, rounds=7, replays=5)
    best = min(times, key=times.get)
    chunk, warps = configs[list(calls).index(best)]
    extra = alternating_graph_us({
        "chain_no_pdl": lambda: streams.launch_chain(chunk, warps, pdl=False),
        "one_launch": lambda: streams.launch_one(chunk, warps),
    }, rounds=7, replays=5)
    if by_kind:
        kinds = time_by_kind(chain, set(cfg.attention_layers), chunk, warps, device)
        for kind in kinds.values():
            kind["copy_us"] = kind["bytes_per_kernel"] / bandwidth * 1e6
        for name, kind in kinds.items():
            log.info("  %-18s x%-3d %7.2f us a kernel, its bytes at the copy bandwidth %7.2f us", name,
                     kind["kernels"], kind["us_per_kernel"], kind["copy_us"])
    result = {
        "batch": batch, "context": context, "kernels": len(chain), "bytes": total, "roofline_us": roofline_us,
        "chain_us": times, "best": best, "floor_us": times[best],
        "floor_fraction_of_roofline": roofline_us / times[best],
        "chain_no_pdl_us": extra["chain_no_pdl"], "no_pdl_fraction": roofline_us / extra["chain_no_pdl"],
        "one_launch_us": extra["one_launch"], "one_launch_fraction": roofline_us / extra["one_launch"],
        "by_kind": kinds if by_kind else None,
        "kernel_bytes": [{"name": k.name, "read": k.read_bytes, "write": k.write_bytes, "early": k.early_read_bytes}
                         for k in chain[:8]],
    }
    log.info("batch %d, context %d: %d kernels, roofline %.1f us, chain floor %.1f us (%.3f; %s), no PDL %.1f, "
             "one launch %.1f", batch, context, len(chain), roofline_us, times[best],
             result["floor_fraction_of_roofline"], best, extra["chain_no_pdl"], extra["one_launch"])
    return result


def plot(results: dict, path: Path) -> None:
    runs = results["runs"]
    labels = [f"B={r['batch']}\n{r['context'] // 1024}K" for r in runs]
    series = [("stream chain, PDL (the floor)", [r["floor_fraction_of_roofline"] for r in runs]),
              ("stream chain, no PDL", [r["no_pdl_fraction"] for r in runs]),
              ("one launch", [r["one_launch_fraction"] for r in runs])]
    if any(r.get("engine_fraction") for r in runs):
        series.append(("engine (bench_decode / bench_batch_decode)", [r.get("engine_fraction") or 0 for r in runs]))
    grouped_bar_chart(path, labels, series, xlabel="batch, context", ylabel="fraction of the HBM roofline",
                      title=f"{results['model']} decode step as a chain of stream kernels, {results['gpu']}",
                      hline=("issue 24 single-request goal", 0.75))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b")
    parser.add_argument("--cases", default="1x1024,1x32768,1x131072,8x4096", help="BATCHxCONTEXT,...")
    parser.add_argument("--chunks", default="2048,4096,8192,16384,32768", help="bf16 elements per program")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--by-kind", action="store_true",
                        help="also time each kind of kernel alone (chains of that kind), for every case")
    parser.add_argument("--engine", default="", help="bench_decode / bench_batch_decode JSON files, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("decode_floor.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    device = torch.device("cuda")
    cfg = preset_config(args.model)
    model = Qwen35ForCausalLM(cfg, torch.bfloat16, "meta", torch_ops(), page_size=64)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    configs = [(int(c), int(w)) for c in args.chunks.split(",") for w in args.warps.split(",")]
    engine = engine_fractions([Path(p) for p in args.engine.split(",") if p])
    bandwidth = measure_copy_bandwidth(device)
    log.info("device-to-device copy: %.0f GB/s (read + write)", bandwidth / 1e9)
    results = {"benchmark": "decode step as a chain of stream kernels", "model": args.model,
               "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "copy_bandwidth_GBps": bandwidth / 1e9, "engine_results": args.engine, "runs": []}
    for batch, context in parse_cases(args.cases):
        run = bench_case(params, cfg, batch, context, bandwidth, configs, device, by_kind=args.by_kind)
        run["engine_fraction"] = engine.get((batch, context))
        results["runs"].append(run)
        torch.cuda.empty_cache()  # the case's arena
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"{'batch':>5} {'context':>8} {'kernels':>7} {'roofline us':>11} {'floor us':>9} {'floor':>6} "
          f"{'no PDL':>6} {'1 launch':>8} {'engine':>6}")
    for r in results["runs"]:
        print(f"{r['batch']:>5} {r['context']:>8} {r['kernels']:>7} {r['roofline_us']:>11.1f} {r['floor_us']:>9.1f} "
              f"{r['floor_fraction_of_roofline']:>6.3f} {r['no_pdl_fraction']:>6.3f} {r['one_launch_fraction']:>8.3f} "
              f"{r['engine_fraction'] or 0:>6.3f}")


if __name__ == "__main__":
    main()
