"""Where a single-request decode step spends its time: host work vs GPU work, and GPU time per kernel.

    python -m loadtest.profile_decode --model qwen3.5-35b-a3b:20 --contexts 1024,131072 --out profile.json

For each context: the wall time per ``Engine.step()`` over consecutive steps (what bench_decode reports),
with the overlap scheduler on and off, the GPU time of the decode CUDA graph replayed back to back (no
host in between), and the host-side pieces of a step timed one by one (schedule, graph inputs and
attention planning, sampling, waiting for and processing the tokens). Then eager steps under
``torch.profiler``: GPU time per kernel name, summed, so the biggest consumers stand out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from loadtest.bench_decode import single_request_config
from services.engine.engine import Engine
from services.engine.request import SamplingParams

log = logging.getLogger("profile_decode")


def _step_ms(engine: Engine, steps: int, overlap: bool) -> float:
    """Wall time per step over ``steps`` consecutive steps (no synchronisation between them: with the
    overlap scheduler a step returns with the next one already on the device)."""
    engine.config = dataclasses.replace(engine.config, overlap_schedule=overlap)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def _graph_replay_ms(engine: Engine, repeats: int) -> float:
    graph = engine.runner.graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _host_parts(engine: Engine, steps: int) -> dict[str, float]:
    """Median ms per step of each piece of ``Engine.step()``, timed by wrapping the pieces in place.
    ``graph_inputs_and_plan`` includes launching the replay; ``wait_and_process`` includes waiting for the
    step in flight (the step's one synchronisation), so with the overlap scheduler it holds the GPU time
    that the host does not cover."""
    runner, graphs = engine.runner, engine.runner.graphs
    pieces = {"schedule": (engine.scheduler, "schedule"),
              "schedule_ahead": (engine.scheduler, "schedule_decode_ahead"),
              "build_batch": (runner, "build_batch"), "graph_inputs_and_plan": (graphs, "run"),
              "sample": (runner, "sampler"), "wait_and_process": (engine, "_process")}
    times: dict[str, list[float]] = {name: [] for name in pieces}
    originals = {name: getattr(obj, attr) for name, (obj, attr) in pieces.items()}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            times[name].append(time.perf_counter() - start)
            return result
        return wrapper

    for name, (obj, attr) in pieces.items():
        setattr(obj, attr, timed(name, originals[name]))
    try:
        for _ in range(steps):
            engine.step()
    finally:
        for name, (obj, attr) in pieces.items():
            setattr(obj, attr, originals[name])
    return {name: statistics.median(v) * 1e3 for name, v in times.items() if v}


def kernel_table(engine: Engine, steps: int) -> list[dict]:
    """GPU time per kernel name over ``steps`` eager decode steps, per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.runner.graphs  # None without CUDA graphs (and on CPU)
    cuda = engine.runner.device.type == "cuda"
    graphs_were_enabled = graphs is not None and graphs.enabled
    if graphs is not None:
        graphs.enabled = False
    try:
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        if graphs is not None:
            graphs.enabled = graphs_were_enabled  # (graphs that were off, e.g. not capturable, stay off)
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us > 0:
            rows.append({"name": event.key[:120], "us_per_step": device_us / steps,
                         "calls_per_step": event.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3.5-35b-a3b:20")
    parser.add_argument("--contexts", default="1024")
    parser.add_argument("--prefill-chunk-size", type=int, default=8192)
    parser.add_argument("--out", default="profile.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    contexts = [int(c) for c in args.contexts.split(",")]
    config = single_request_config(args.model, max(contexts) + 4096, args.prefill_chunk_size,
                                   cuda_graph_max_batch=8, enable_prefix_cache=False)
    engine = Engine(config)
    results = {"model": args.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for i, context in enumerate(contexts):
        prompt = torch.randint(0, 1000, (context,), generator=torch.Generator().manual_seed(i)).tolist()
        request_id = engine.add_request(prompt, SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True))
        while not any(o.new_token_ids for o in engine.step()):
            pass
        log.info("context %d: prefilled", context)
        for _ in range(5):
            engine.step()
        sequential_ms = _step_ms(engine, 40, overlap=False)
        step_ms = _step_ms(engine, 40, overlap=True)
        engine.step()  # nothing in flight below: the replay timing owns the device
        torch.cuda.synchronize()
        engine.config = dataclasses.replace(engine.config, overlap_schedule=False)
        engine.step()
        replay_ms = _graph_replay_ms(engine, 50)
        engine.config = dataclasses.replace(engine.config, overlap_schedule=True)
        host = _host_parts(engine, 30)
        kernels = kernel_table(engine, 5)
        run = {"context": context, "engine_step_ms": step_ms, "engine_step_ms_no_overlap": sequential_ms,
               "graph_replay_ms": replay_ms, "exposed_host_ms": step_ms - replay_ms,
               "exposed_host_ms_no_overlap": sequential_ms - replay_ms, "host_parts_ms": host,
               "kernels": kernels[:40], "kernels_total_us": sum(k["us_per_step"] for k in kernels)}
        results["runs"].append(run)
        print(f"\ncontext {context}: engine step {step_ms:.3f} ms (no overlap {sequential_ms:.3f}), graph "
              f"replay {replay_ms:.3f} ms, eager kernels {run['kernels_total_us'] / 1e3:.3f} ms; host parts {host}")
        for k in kernels[:25]:
            print(f"  {k['us_per_step']:9.1f} us  x{k['calls_per_step']:5.1f}  {k['name']}")
        engine.abort_request(request_id)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
