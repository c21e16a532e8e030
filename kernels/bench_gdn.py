"""Benchmark the Triton GDN kernels (decode, chunked varlen prefill, causal conv1d) against fla and torch,
at Qwen3.5-397B (64 value heads, 16 key heads, dim 128) and Qwen3.5-35B-A3B (32 value heads) shapes, bf16.

    python -m kernels.bench_gdn --out results.json            # writes results.json and results.png
    python -m kernels.bench_gdn --out results.json --sweep    # also sweeps launch configs (slower: compiles)
    python -m kernels.bench_gdn --smoke --out /tmp/smoke.json # tiny shapes; runs on CPU (interpreter)

Every case is first checked against the torch reference (kernels/gdn.py, kernels/conv1d.py); a failure
raises (exit status != 0) before anything is timed. fla (flash-linear-attention) is optional: without it
the fla columns are null and a note says why.

Timing:
- decode and conv1d update: the calls are captured in a CUDA graph (as in the decode runner), each call on
  a different layer of the state pool (or a different copy of fla's states) so the 4 MiB/layer states come
  from HBM, not L2; per-call time = graph time / calls. The device-to-device copy of the same state bytes
  (read + write) is timed the same way: it is the bandwidth ceiling of a decode step.
- prefill: ours (with a prebuilt plan, ``plan_gdn_prefill``, as the model builds it once per forward pass)
  and fla are each captured in a CUDA graph and the two graphs replayed in alternation (median of 7
  rounds), so both are timed on the device alone and under the same clocks. (Timing them one after the
  other with ``do_bench`` let fla's Python launch overhead of ~8 kernels and run-to-run drift into its
  number: the same 397B 8K call measured 1581 us in one row and 1015 us in another.) fla gets g and beta
  precomputed (its gating is not timed). ``ours_with_planning_us`` (``do_bench``) adds the host planning.
- conv1d prefill: ``triton.testing.do_bench`` median (L2 flushed before each call).
- ``kernels_us``: per-kernel device time from torch.profiler, to see how prefill splits between the
  prep kernel and the state pass.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Smoke runs on CPU use Triton's interpreter; must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from kernels import conv1d as conv_ref  # noqa: E402
from kernels import gdn as gdn_ref  # noqa: E402
from kernels.bench_util import alternating_graph_us  # noqa: E402
from kernels.triton.conv1d import conv1d_prefill, conv1d_update  # noqa: E402
from kernels.triton.gdn_chunk import gdn_prefill, plan_gdn_prefill, prefill_config  # noqa: E402
from kernels.triton.gdn_decode import decode_config, gdn_decode  # noqa: E402

DECODE_TOL = 1e-2  # relative Frobenius error vs the fp32 reference on bf16 inputs
PREFILL_TOL = 2e-2  # long sequences: bf16 operands over many chunks
CONV_KERNEL = 4


@dataclass(frozen=True)
class GdnShape:
    key: str
    name: str
    hv: int
    hk: int
    d: int

    @property
    def conv_dim(self) -> int:
        return 2 * self.hk * self.d + self.hv * self.d

    @property
    def state_bytes(self) -> int:  # one request, one layer
        return self.hv * self.d * self.d * 4


SHAPES = {
    "397b": GdnShape("397b", "Qwen3.5-397B", 64, 16, 128),
    "35b": GdnShape("35b", "Qwen3.5-35B-A3B", 32, 16, 128),
}
SMOKE_SHAPES = {"smoke": GdnShape("smoke", "smoke", 4, 2, 32)}


# ------------------------------------------------------------------------------------------------- timing


class Timer:
    """CUDA timing (graphs, do_bench, profiler); on CPU (smoke runs) a plain wall clock."""

    def __init__(self, device: torch.device, rep_ms: int) -> None:
        self.cuda = device.type == "cuda"
        self.rep_ms = rep_ms

    def graph_us(self, calls: list[Callable[[], object]], min_calls: int = 32) -> tuple[float, str]:
        """Per-call time of ``calls`` replayed in one CUDA graph (repeated to >= min_calls calls)."""
        for fn in calls:  # compile / autotune outside the capture
            fn()
        if not self.cuda:
            start = time.perf_counter()
            for fn in calls:
                fn()
            return (time.perf_counter() - start) / len(calls) * 1e6, "wall"
        repeat = max(1, math.ceil(min_calls / len(calls)))
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for fn in calls:  # warm the caching allocator on the side stream, as capture requires
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                for _ in range(repeat):
                    for fn in calls:
                        fn()
        except Exception as err:  # noqa: BLE001 - fall back to plain launches, say so in the result
            torch.cuda.synchronize()
            print(f"  graph capture failed ({type(err).__name__}: {err}); timing plain launches", file=sys.stderr)
            return self.events_us(calls), "events"
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        deadline = time.perf_counter() + self.rep_ms / 1e3
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / (repeat * len(calls)))
        del graph
        return statistics.median(times), "graph"

    def events_us(self, calls: list[Callable[[], object]]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            for fn in calls:
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(calls))
        return statistics.median(times)

    def alternating_us(self, calls: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Per-call time of each named call, each in its own CUDA graph, replayed in alternation."""
        if not self.cuda:
            return {name: self.bench_us(fn) for name, fn in calls.items()}
        return alternating_graph_us(calls, rounds=7, replays=3)

    def bench_us(self, fn: Callable[[], object]) -> float:
        """Median time of one call with the L2 flushed before it."""
        if not self.cuda:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        return float(triton.testing.do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median")) * 1e3

    def kernels_us(self, fn: Callable[[], object], iters: int = 5) -> dict[str, float]:
        """Device time per call of each kernel that ``fn`` launches (torch.profiler)."""
        if not self.cuda:
            return {}
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        result = {}
        for evt in prof.key_averages():
            total = getattr(evt, "device_time_total", None)
            if total is None:
                total = getattr(evt, "cuda_time_total", 0.0)
            if total:
                result[evt.key[:80]] = round(total / iters, 2)
        return dict(sorted(result.items(), key=lambda kv: -kv[1]))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def require(name: str, err: float, tol: float) -> None:
    if not err < tol:
        raise RuntimeError(f"{name}: relative error {err:.3e} exceeds {tol:.0e}; refusing to time a wrong kernel")


# ------------------------------------------------------------------------------------------------ inputs


def gdn_inputs(shape: GdnShape, tokens: tuple[int, ...], device: torch.device, gen: torch.Generator):
    """q, k, v, a, b as strided views of packed projections (as the model produces them) and the decay
    parameters at the scale of trained Qwen3.5 layers (A in [1, 16], dt in [1e-3, 1e-1])."""
    mixed = torch.randn(*tokens, shape.conv_dim, generator=gen).to(device, torch.bfloat16)
    q, k, v = mixed.split([shape.hk * shape.d, shape.hk * shape.d, shape.hv * shape.d], dim=-1)
    q, k = q.unflatten(-1, (shape.hk, shape.d)), k.unflatten(-1, (shape.hk, shape.d))
    v = v.unflatten(-1, (shape.hv, shape.d))
    ba = torch.randn(*tokens, 2 * shape.hv, generator=gen).to(device, torch.bfloat16)
    b, a = ba.split([shape.hv, shape.hv], dim=-1)
    A_log = torch.empty(shape.hv).uniform_(0.0, math.log(16.0), generator=gen).to(device)
    dt = torch.exp(torch.empty(shape.hv).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    dt_bias = (dt + torch.log(-torch.expm1(-dt))).to(device)  # inverse softplus
    return q, k, v, a, b, A_log, dt_bias


def gating(a, b, A_log, dt_bias):
    """g and beta as the model computes them."""
    return -A_log.exp() * F.softplus(a.float() + dt_bias), b.sigmoid()


def load_fla() -> tuple[dict, str | None]:
    try:
        import fla  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as err:  # noqa: BLE001 - any import failure just disables the comparison
        return {}, f"fla not importable ({type(err).__name__}: {err}); fla columns skipped"
    try:
        from importlib.metadata import version

        fla_version = version("flash-linear-attention")
    except Exception:  # noqa: BLE001
        fla_version = getattr(sys.modules["fla"], "__version__", "unknown")
    return {"chunk": chunk_gated_delta_rule, "recurrent": fused_recurrent_gated_delta_rule,
            "version": fla_version}, None


def call_fla(fn, **kwargs):
    """Calls an fla op with the keyword arguments its signature accepts (the API moves between versions)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def expand_heads(x: torch.Tensor, hv: int) -> torch.Tensor:
    return x.repeat_interleave(hv // x.shape[-2], dim=-2)


# ------------------------------------------------------------------------------------------------- decode


def bench_decode(shape: GdnShape, batch: int, timer: Timer, device, fla: dict, sweep: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # Enough layers that the states rotated through per graph exceed L2 several times over.
    layers = max(2, min(64, math.ceil(256e6 / (batch * shape.state_bytes)))) if timer.cuda else 2
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(shape, (batch, 1), device, gen)
    pool = torch.empty(2 * batch, layers, shape.hv, shape.d, shape.d, device=device)
    pool.normal_(0.0, 0.05, generator=None)
    slots = torch.randperm(2 * batch, generator=gen)[:batch].to(device)
    out = torch.empty(batch, 1, shape.hv, shape.d, dtype=torch.bfloat16, device=device)

    # correctness (layer 0) before timing
    g, beta = gating(a, b, A_log, dt_bias)
    init = pool[slots, 0].clone()
    gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, 0], slots, out=out)
    ref_out, ref_state = gdn_ref.recurrent_gated_delta_rule(q, k, v, g, beta, init)
    errs = {"out": rel_err(out, ref_out), "state": rel_err(pool[slots, 0], ref_state)}
    for name, err in errs.items():
        require(f"decode {shape.name} B={batch} {name}", err, DECODE_TOL)

    block_v, num_warps, evict = decode_config(batch, shape.hv, shape.d)

    def ours(bv: int, nw: int, evict: bool | None = None) -> list[Callable[[], object]]:
        return [
            (lambda layer=layer: gdn_decode(q, k, v, a, b, A_log, dt_bias, pool[:, layer], slots, out=out,
                                            block_v=bv, num_warps=nw, evict_state=evict))
            for layer in range(layers)
        ]

    t_ours, how = timer.graph_us(ours(block_v, num_warps))
    result = {
        "shape": shape.name, "model": shape.key, "batch": batch, "layers_rotated": layers,
        "block_v": block_v, "num_warps": num_warps, "evict_state": evict,
        "ours_us": t_ours, "timing": how, "err_out": errs["out"], "err_state": errs["state"],
    }
    if sweep:
        grid = {}
        for bv in (16, 32, 64, 128):
            for nw in (1, 2, 4, 8):
                if bv > shape.d or bv * shape.d // (32 * nw) < 4:
                    continue
                grid[f"BV{bv}_w{nw}"] = timer.graph_us(ours(bv, nw))[0]
        for evict in (False, True):  # the state's L2 eviction policy, at the default tile
            grid[f"BV{block_v}_w{num_warps}_evict_{'first' if evict else 'normal'}"] = timer.graph_us(
                ours(block_v, num_warps, evict))[0]
        result["sweep_us"] = grid
        best = min(grid, key=grid.get)
        result["best_config"], result["best_us"] = best, grid[best]

    # device-to-device copy of the same state bytes: the bandwidth ceiling
    nbytes = batch * shape.state_bytes
    src = torch.empty(layers, batch * shape.hv * shape.d * shape.d, device=device)
    src.normal_()
    dst = torch.empty_like(src)
    copies = [(lambda layer=layer, s=src, d=dst: d[layer].copy_(s[layer])) for layer in range(layers)]
    t_copy, _ = timer.graph_us(copies)
    del copies
    del src, dst
    best_ours = result.get("best_us", t_ours)
    result.update({
        "copy_us": t_copy, "state_MiB": nbytes / 2**20,
        "ours_GBps": 2 * nbytes / (t_ours * 1e-6) / 1e9, "copy_GBps": 2 * nbytes / (t_copy * 1e-6) / 1e9,
        "frac_of_copy": t_copy / t_ours, "best_frac_of_copy": t_copy / best_ours,
    })

    if fla:
        result.update(bench_fla_decode(shape, batch, timer, fla, layers, q, k, v, g, beta, init, ref_out))
        if result.get("fla_us"):
            result["speedup_vs_fla"] = result["fla_us"] / t_ours
            result["best_speedup_vs_fla"] = result["fla_us"] / best_ours
    return result


def bench_fla_decode(shape, batch, timer, fla, layers, q, k, v, g, beta, init, ref_out) -> dict:
    states = init.unsqueeze(0).repeat(layers, 1, 1, 1, 1)  # contiguous [layers, B, Hv, Dk, Dv]
    q4, k4, v4 = q.contiguous(), k.contiguous(), v.contiguous()
    result: dict = {}
    for expanded in (False, True):
        qq, kk = (expand_heads(q4, shape.hv), expand_heads(k4, shape.hv)) if expanded else (q4, k4)

        def run(layer: int, qq=qq, kk=kk):
            return call_fla(fla["recurrent"], q=qq, k=kk, v=v4, g=g, beta=beta, initial_state=states[layer],
                            output_final_state=True, use_qk_l2norm_in_kernel=True)

        try:
            err = rel_err(run(0)[0], ref_out)
        except Exception as exc:  # noqa: BLE001 - e.g. no grouped-value-head support: retry with expanded q/k
            result[f"fla_error{'_expanded' if expanded else ''}"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if err < DECODE_TOL:
            t, how = timer.graph_us([(lambda layer=layer: run(layer)) for layer in range(layers)])
            result.update({"fla_us": t, "fla_timing": how, "fla_err_out": err, "fla_qk_expanded": expanded})
            return result
        result[f"fla_err_out{'_expanded' if expanded else ''}"] = err
    result["fla_us"] = None
    return result


# ------------------------------------------------------------------------------------------------ prefill


def reference_prefill(q, k, v, g, beta, init_states, cu):
    outs, states = [], []
    for seq in range(len(cu) - 1):
        rows = slice(cu[seq], cu[seq + 1])
        o, s = gdn_ref.chunk_gated_delta_rule(q[rows][None], k[rows][None], v[rows][None], g[rows][None],
                                              beta[rows][None], init_states[seq : seq + 1])
        outs.append(o[0])
        states.append(s[0])
    return torch.cat(outs), torch.stack(states)


def bench_prefill(shape: GdnShape, lens: list[int], timer: Timer, device, fla: dict, sweep: bool, seed: int,
                  checkpoint_every: int | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    total, num_seqs = cu[-1], len(lens)
    q, k, v, a, b, A_log, dt_bias = gdn_inputs(shape, (total,), device, gen)
    checkpoints = []
    if checkpoint_every:
        for seq, n in enumerate(lens):
            checkpoints += [(seq, off, None) for off in range(checkpoint_every, n, checkpoint_every)]
    num_slots = 2 * num_seqs + len(checkpoints)
    pool = torch.empty(num_slots, 2, shape.hv, shape.d, shape.d, device=device)
    pool.normal_(0.0, 0.05)
    states = pool[:, 1]
    perm = torch.randperm(num_slots, generator=gen).tolist()
    slots_list = perm[:num_seqs]
    checkpoints = [(s, o, d) for (s, o, _), d in zip(checkpoints, perm[num_seqs : num_seqs + len(checkpoints)],
                                                      strict=True)]
    slots = torch.tensor(slots_list, device=device)
    has_init = [True] * num_seqs
    plan = plan_gdn_prefill(cu, has_init, checkpoints, device)
    out = torch.empty(total, shape.hv, shape.d, dtype=torch.bfloat16, device=device)

    # correctness before timing
    g, beta = gating(a, b, A_log, dt_bias)
    init = states[slots].clone()
    gdn_prefill(q, k, v, a, b, A_log, dt_bias, states, slots, None, None, plan=plan, out=out)
    ref_out, ref_states = reference_prefill(q, k, v, g, beta, init, cu)
    errs = {"out": rel_err(out, ref_out), "state": rel_err(states[slots], ref_states)}
    if checkpoints:
        seq, off, dest = checkpoints[len(checkpoints) // 2]
        rows = slice(cu[seq], cu[seq] + off)
        _, ref_ck = gdn_ref.chunk_gated_delta_rule(q[rows][None], k[rows][None], v[rows][None], g[rows][None],
                                                   beta[rows][None], init[seq : seq + 1])
        errs["checkpoint"] = rel_err(states[dest], ref_ck[0])
    for name, err in errs.items():
        require(f"prefill {shape.name} {lens} {name}", err, PREFILL_TOL)
    del ref_out, ref_states

    cfg = prefill_config(num_seqs, shape.hv, shape.d,
                         torch.cuda.get_device_properties(device).multi_processor_count if timer.cuda else 132)

    def ours(**launch):
        return lambda: gdn_prefill(q, k, v, a, b, A_log, dt_bias, states, slots, None, None, plan=plan, out=out,
                                   **launch)

    fla_call = fla_prefill_call(shape, fla, q, k, v, g, beta, init, cu) if fla else None
    timed = {"ours": ours()}
    if fla_call is not None and fla_call[0] is not None:
        timed["fla"] = fla_call[0]
    times = timer.alternating_us(timed)
    t_ours = times["ours"]
    t_ours_host = timer.bench_us(
        lambda: gdn_prefill(q, k, v, a, b, A_log, dt_bias, states, slots, cu, has_init, checkpoints, out=out)
    )
    result = {
        "shape": shape.name, "model": shape.key, "seq_lens": lens, "total_tokens": total,
        "checkpoints": len(checkpoints),
        "config": cfg, "ours_us": t_ours, "ours_with_planning_us": t_ours_host,
        "ours_Mtok_per_s": total / t_ours, "kernels_us": timer.kernels_us(ours()),
        **{f"err_{name}": err for name, err in errs.items()},
    }
    if sweep:
        # state-pass configs with the default prep kernel, then prep configs with the best state pass
        grid: dict[str, float | None] = {}

        def try_config(key: str, launch: dict) -> None:
            try:
                grid[key] = timer.alternating_us({key: ours(**launch)})[key]
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this config
                grid[key] = None
                print(f"  {key}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)

        state_launch = {}
        for block_v in (32, 64):
            for stages in (1, 2, 3):
                for warps in (4, 8):
                    for maxnreg in (None, 168):
                        launch = dict(block_v=block_v, state_stages=stages, state_warps=warps,
                                      state_maxnreg=maxnreg)
                        key = f"BV{block_v}_s{stages}_w{warps}_r{maxnreg}"
                        state_launch[key] = launch
                        try_config(key, launch)
        valid = {key: t for key, t in grid.items() if t is not None}
        best_state = state_launch[min(valid, key=valid.get)]
        for prep_warps in (4, 8):
            for prep_maxnreg in (None, 168):
                try_config(f"best_state+pw{prep_warps}_pr{prep_maxnreg}",
                           dict(best_state, prep_warps=prep_warps, prep_maxnreg=prep_maxnreg))
        result["sweep_us"] = grid
        valid = {key: t for key, t in grid.items() if t is not None}
        best = min(valid, key=valid.get)
        result["best_config"], result["best_us"], result["best_state_launch"] = best, valid[best], best_state

    if fla_call is not None:
        run, info = fla_call
        result.update(info)
        if run is not None:
            result["fla_us"] = times["fla"]
            result["fla_kernels_us"] = timer.kernels_us(run)
            result["fla_Mtok_per_s"] = total / result["fla_us"]
            result["speedup_vs_fla"] = result["fla_us"] / t_ours
            if "best_us" in result:
                result["best_speedup_vs_fla"] = result["fla_us"] / result["best_us"]
        else:
            result["fla_us"] = None
    return result


def fla_prefill_call(shape, fla, q, k, v, g, beta, init, cu) -> tuple[Callable[[], object] | None, dict]:
    """fla's chunked prefill on the same batch, checked on the first sequence: (the call, or None where no
    variant matched the reference; what was found). fla gets g and beta precomputed (its gating is not timed)
    and grouped q/k as they are, else expanded to the value heads if it needs that."""
    q4, k4, v4 = q.contiguous()[None], k.contiguous()[None], v.contiguous()[None]
    g4, beta4 = g[None].contiguous(), beta[None].contiguous()
    cu_long = torch.tensor(cu, dtype=torch.long, device=q.device)
    check = slice(0, cu[1])  # first sequence vs the reference
    ref_first, _ = gdn_ref.chunk_gated_delta_rule(q[check][None], k[check][None], v[check][None], g[check][None],
                                                  beta[check][None], init[:1])
    info: dict = {}
    for expanded in (False, True):
        qq, kk = (expand_heads(q4, shape.hv), expand_heads(k4, shape.hv)) if expanded else (q4, k4)

        def run(qq=qq, kk=kk):
            return call_fla(fla["chunk"], q=qq, k=kk, v=v4, g=g4, beta=beta4, initial_state=init,
                            output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_long)

        try:
            err = rel_err(run()[0][0, check], ref_first[0])
        except Exception as exc:  # noqa: BLE001 - e.g. no grouped-value-head support: retry with expanded q/k
            info[f"fla_error{'_expanded' if expanded else ''}"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if err < PREFILL_TOL:
            info.update({"fla_err_out_first_seq": err, "fla_qk_expanded": expanded})
            return run, info
        info[f"fla_err_out{'_expanded' if expanded else ''}"] = err
    return None, info


# ------------------------------------------------------------------------------------------------- conv1d


def bench_conv(shape: GdnShape, lens: list[int], batch: int, timer: Timer, device, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    dim = shape.conv_dim
    weight = torch.randn(dim, CONV_KERNEL, generator=gen).to(device, torch.bfloat16)
    results = []

    # prefill: packed varlen, every sequence continuing from a cached state
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    num_seqs = len(lens)
    pool = torch.randn(2 * num_seqs, 2, dim, CONV_KERNEL - 1, generator=gen).to(device, torch.bfloat16)
    states = pool[:, 1]
    slots_list = torch.randperm(2 * num_seqs, generator=gen)[:num_seqs].tolist()
    slots = torch.tensor(slots_list, device=device)
    cu_dev = torch.tensor(cu, device=device)
    has_init = torch.ones(num_seqs, dtype=torch.int32, device=device)
    x = torch.randn(cu[-1], dim, generator=gen).to(device, torch.bfloat16)
    init = states[slots].clone()
    out = conv1d_prefill(x, weight, states, slots, cu_dev, has_init)
    for seq in range(num_seqs):
        ref, ref_state = conv_ref.causal_conv1d_prefill(x[cu[seq] : cu[seq + 1]], weight, init[seq])
        require(f"conv1d prefill seq {seq}", rel_err(out[cu[seq] : cu[seq + 1]], ref), DECODE_TOL)
        require(f"conv1d prefill state {seq}", rel_err(states[slots_list[seq]], ref_state), 1e-6)

    def torch_prefill():  # what the model runs today: per sequence, state written back
        for seq in range(num_seqs):
            o, s = conv_ref.causal_conv1d_prefill(x[cu[seq] : cu[seq + 1]], weight, states[slots_list[seq]])
            states[slots_list[seq]] = s

    t_ours = timer.bench_us(lambda: conv1d_prefill(x, weight, states, slots, cu_dev, has_init))
    t_torch = timer.bench_us(torch_prefill)
    moved = 2 * x.numel() * x.element_size()
    results.append({"kind": "conv1d_prefill", "shape": shape.name, "model": shape.key, "seq_lens": lens, "dim": dim,
                    "ours_us": t_ours,
                    "torch_us": t_torch, "speedup_vs_torch": t_torch / t_ours,
                    "ours_GBps": moved / (t_ours * 1e-6) / 1e9})

    # decode update, in a graph, rotating over layers of the pool
    layers = 8 if timer.cuda else 2
    pool = torch.randn(2 * batch, layers, dim, CONV_KERNEL - 1, generator=gen).to(device, torch.bfloat16)
    slots = torch.randperm(2 * batch, generator=gen)[:batch].to(device)
    x = torch.randn(batch, dim, generator=gen).to(device, torch.bfloat16)
    init = pool[slots, 0].clone()
    out = conv1d_update(x, weight, pool[:, 0], slots)
    ref = conv_ref.causal_conv1d_update(x, weight, init)
    require(f"conv1d update B={batch}", rel_err(out, ref), DECODE_TOL)
    require(f"conv1d update state B={batch}", rel_err(pool[slots, 0], init), 1e-6)

    def torch_update(layer: int):  # the model's decode path: gather, update, scatter
        view = pool[:, layer]
        gathered = view[slots]
        o = conv_ref.causal_conv1d_update(x, weight, gathered)
        view[slots] = gathered
        return o

    t_ours, how = timer.graph_us([(lambda layer=layer: conv1d_update(x, weight, pool[:, layer], slots))
                                  for layer in range(layers)])
    t_torch, _ = timer.graph_us([(lambda layer=layer: torch_update(layer)) for layer in range(layers)])
    results.append({"kind": "conv1d_update", "shape": shape.name, "model": shape.key, "batch": batch, "dim": dim,
                    "ours_us": t_ours,
                    "torch_us": t_torch, "speedup_vs_torch": t_torch / t_ours, "timing": how})
    return results


# --------------------------------------------------------------------------------------------------- main


def plot(results: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    for shape in sorted({r["model"] for r in results["decode"]}):
        rows = [r for r in results["decode"] if r["model"] == shape]
        batches = [r["batch"] for r in rows]
        ax.plot(batches, [r["ours_us"] for r in rows], "o-", label=f"ours {shape}")
        ax.plot(batches, [r["copy_us"] for r in rows], "k--", alpha=0.5, label=f"state copy {shape}")
        if any(r.get("fla_us") for r in rows):
            ax.plot(batches, [r.get("fla_us") or float("nan") for r in rows], "s:", label=f"fla {shape}")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="us per layer", title="GDN decode step (graph)")
    ax.legend(fontsize=7)
    ax = axes[1]
    rows = results["prefill"]
    labels = [f"{r['model']}\n{r['total_tokens'] / 1024:g}K/{len(r['seq_lens'])}seq"
              + (f"\n+{r['checkpoints']}ck" if r["checkpoints"] else "") for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ours_Mtok_per_s"] for r in rows], 0.4, label="ours")
    ax.bar([x + 0.2 for x in xs], [r.get("fla_Mtok_per_s") or 0 for r in rows], 0.4, label="fla")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set(ylabel="Mtok/s per layer", title="GDN chunked prefill")
    ax.legend(fontsize=7)
    ax = axes[2]
    rows = results["conv1d"]
    labels = [f"{r['kind'].split('_')[1]} {r['model']}\n"
              + (f"B={r['batch']}" if "batch" in r else f"{sum(r['seq_lens']) / 1024:g}K") for r in rows]
    ax.bar(range(len(rows)), [r["speedup_vs_torch"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set(ylabel="speedup vs torch", title="causal conv1d")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_gdn.json"))
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configs (compiles many variants)")
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU under the interpreter)")
    parser.add_argument("--shapes", default="397b,35b")
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--batches", default="", help="decode batch sizes (default 1,8,64,256; --quick 1,64)")
    parser.add_argument("--only", default="decode,prefill,conv1d", help="which of decode, prefill, conv1d to run")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"decode", "prefill", "conv1d"}:
        parser.error(f"--only takes decode, prefill, conv1d; got {args.only}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: only --smoke runs on CPU")
    timer = Timer(device, args.rep_ms)
    fla, fla_note = load_fla() if device.type == "cuda" else ({}, "CPU smoke run: fla skipped")
    notes = [fla_note] if fla_note else []

    if args.smoke:
        shapes = list(SMOKE_SHAPES.values())
        batches, prefill_cases, conv_cases = [1, 3], [([70, 1, 30], None), ([130], 48)], [([5, 40], 2)]
    else:
        shapes = [SHAPES[name] for name in args.shapes.split(",")]
        batches = [1, 64] if args.quick else [1, 8, 64, 256]
        if args.batches:
            batches = [int(b) for b in args.batches.split(",")]
        prefill_cases = [([8192], None), ([1024, 2048, 1024, 4096], None)]
        if not args.quick:
            mixed_32k = [1024, 2048, 3072, 4096, 5120, 6144, 7168, 4096]
            prefill_cases += [([8192], 1040), ([8192] * 4, None), (mixed_32k, None)]
        conv_cases = [([1024, 2048, 1024, 4096], 1), ([8192] * 4, 64)]

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "fla": fla.get("version"),
        "cuda": torch.version.cuda, "python": sys.version.split()[0],
    }
    print(json.dumps(env))
    results: dict = {"env": env, "notes": notes, "decode": [], "prefill": [], "conv1d": []}
    seed = 0
    if "decode" not in only:
        batches = []
    if "prefill" not in only:
        prefill_cases = []
    if "conv1d" not in only:
        conv_cases = []
    for shape in shapes:
        for batch in batches:
            seed += 1
            row = bench_decode(shape, batch, timer, device, fla, args.sweep, seed)
            results["decode"].append(row)
            print(f"decode  {shape.name:16s} B={batch:<4d} ours {row['ours_us']:8.2f} us  copy {row['copy_us']:8.2f} us"
                  f"  frac {row['frac_of_copy']:.2f}  fla {row.get('fla_us') or float('nan'):8.2f} us")
        for lens, every in prefill_cases:
            seed += 1
            row = bench_prefill(shape, lens, timer, device, fla, args.sweep, seed, every)
            results["prefill"].append(row)
            print(f"prefill {shape.name:16s} {len(lens)} seqs {row['total_tokens']:6d} tok ck={row['checkpoints']:<3d}"
                  f" ours {row['ours_Mtok_per_s']:6.2f} Mtok/s  fla {row.get('fla_Mtok_per_s') or float('nan'):6.2f}"
                  f" Mtok/s  kernels {row['kernels_us']}")
        for lens, batch in conv_cases:
            seed += 1
            for row in bench_conv(shape, lens, batch, timer, device, seed):
                results["conv1d"].append(row)
                print(f"conv1d  {shape.name:16s} {row['kind']:15s} ours {row['ours_us']:8.2f} us"
                      f"  torch {row['torch_us']:8.2f} us")
        torch.cuda.empty_cache() if device.type == "cuda" else None

    args.out.write_text(json.dumps(results, indent=1))
    plot_note = plot(results, args.out.with_suffix(".png"))
    if plot_note:
        results["notes"].append(plot_note)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}" + ("" if plot_note else f" and {args.out.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
