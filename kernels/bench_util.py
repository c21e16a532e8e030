"""Helpers shared by the benchmarks."""

from __future__ import annotations

import logging
import statistics
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("bench_util")


def graph_replay_us(calls: Callable[[], object], calls_per_run: int, *, replays: int, samples: int) -> float:
    """Median microseconds per call of ``calls()`` (which makes ``calls_per_run`` calls), captured once in a CUDA
    graph and timed over ``samples`` runs of ``replays`` back-to-back replays. ``calls()`` runs once first on a
    side stream (compiles, warms the caching allocator as capture requires); what it raises propagates."""
    per_run = alternating_graph_us({"calls": calls}, rounds=samples, replays=replays)["calls"]
    return per_run / calls_per_run


def alternating_graph_us(
    calls: dict[str, Callable[[], object]], *, rounds: int = 7, replays: int = 3
) -> dict[str, float]:
    """Median microseconds per call of each named callable, each captured once in its own CUDA graph and
    replayed in alternation (round r times every graph once, ``replays`` replays back to back), so that clock
    and thermal drift fall on all of them alike. Each callable runs once first on a side stream (compiles,
    warms the caching allocator as capture requires); what it raises propagates."""
    graphs = {}
    for name, fn in calls.items():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                fn()
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            fn()
        graphs[name].replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, graph in graphs.items():
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / replays)
    del graphs
    return {name: statistics.median(samples) for name, samples in times.items()}


def per_model_results(benchmark: str, models: list[str], bench_model: Callable[[str, float], dict]) -> dict:
    """The results of a per-model benchmark: ``bench_model(model, copy_bandwidth_bytes_per_s)`` for each model,
    under a header with the GPU, torch and the device-to-device copy bandwidth measured first."""
    device = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(device)
    log.info("device-to-device copy: %.0f GB/s (read + write)", bandwidth / 1e9)
    results = {"benchmark": benchmark, "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "copy_bandwidth_GBps": bandwidth / 1e9, "models": []}
    for model in models:
        results["models"].append(bench_model(model, bandwidth))
        torch.cuda.empty_cache()
    return results


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def measure_gemm_flops(device: torch.device, size: int = 8192, iters: int = 20) -> float:
    """FLOP/s of a large bf16 matrix product (cuBLAS, random operands: zeros run faster), the compute ceiling
    the benchmarks measure against."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device, generator=gen)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device, generator=gen)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / statistics.median(times)


def grouped_bar_chart(
    path: Path, labels: list[str], series: list[tuple[str, list[float]]], *, xlabel: str, ylabel: str, title: str,
    hline: tuple[str, float] | None = None,
) -> None:
    """One group of bars per label, one bar per series (name, values), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    xs = range(len(labels))
    legend_rows = -(-(len(series) + (hline is not None)) // 2)
    height = 4 + 0.25 * legend_rows
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(labels)), height))
    for i, (name, values) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], values, width=width, label=name)
    if hline is not None:
        ax.axhline(hline[1], color="k", linestyle="--", label=hline[0])
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 70), fontsize=10)  # run descriptions are long: wrap, don't clip
    # Under the plot, in a strip of its own: inside the axes it covered the bars of the last groups.
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
