"""``python -m loadtest.simulator run|compare|sweep ...``: the router simulator's command line.

    run      one simulation; prints its report as JSON
    compare  every policy over cluster sizes and cache sizes; JSON + PNG, and the table at one cluster size
    seeds    a policy against the oracle over workload seeds (paired), at one cluster size; JSON + PNG + table
    sweep    cache_aware's weights over a grid against the oracle, per cache size; JSON + PNG, and the choice

Every field of the simulation's config is a flag (``--workers``, ``--users-per-worker``, ``--duration-s``,
``--first-turn-tokens``, ``--token-scale``, ...; ``--help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from services.common.config import add_config_args, config_from

from .config import SimConfig
from .experiments import compare, seeds, seeds_table, sweep, table
from .plots import plot_compare, plot_seeds, plot_sweep
from .router import POLICIES
from .simulation import run, time_model


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.simulator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one simulation")
    grid = sub.add_parser("compare", help="policies over cluster and cache sizes")
    grid.add_argument("--workers-list", type=_ints, default=[8, 32, 128, 1000])
    grid.add_argument("--policies", default=",".join(POLICIES))
    grid.add_argument("--table-workers", type=int, default=0, help="cluster size of the printed table (0: largest)")
    paired = sub.add_parser("seeds", help="a policy against the oracle over workload seeds, paired")
    paired.add_argument("--policies", default="cache_aware,oracle", help="the first is compared with the last")
    paired.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3, 4], help="workload seeds")
    weights = sub.add_parser("sweep", help="cache_aware weights against the oracle")
    weights.add_argument("--queue", type=_floats, default=[0.0, 0.1, 1.0])
    weights.add_argument("--request", type=_floats, default=[0.0, 512.0])
    weights.add_argument("--session", type=_floats, default=[0.0, 8192.0, 32768.0])
    weights.add_argument("--memory", type=_floats, default=None, help="memory weights (default: --weight-memory)")
    weights.add_argument("--seeds", type=_ints, default=[0, 1], help="workload seeds (results are averaged)")
    for p in (grid, paired, weights):
        p.add_argument("--cache-sizes", type=_ints, default=[1_000_000, 250_000, 125_000],
                       help="KV tokens per worker, one simulation set each")
        p.add_argument("--jobs", type=int, default=2, help="simulations run at once (processes)")
        p.add_argument("--out", required=True, help="JSON path; the PNG is written beside it")
    for p in (one, grid, paired, weights):
        add_config_args(p, SimConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = config_from(SimConfig, vars(args), env={})
    if args.command == "run":
        report = run(config)
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    if args.command == "compare":
        result = compare(config, args.workers_list, args.cache_sizes, args.policies.split(","), args.jobs)
        shown = args.table_workers or max(args.workers_list)
        result["table_workers"] = shown
        result["table"] = table(result, shown)
        plot = plot_compare
    elif args.command == "seeds":
        result = seeds(config, args.cache_sizes, args.policies.split(","), args.seeds, args.jobs)
        result["table"] = seeds_table(result)
        plot = plot_seeds
    else:
        result = sweep(config, args.cache_sizes, args.queue, args.request, args.session, args.jobs, args.seeds,
                       args.memory)
        plot = plot_sweep
    result["time_model"] = time_model(config).describe()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    if "table" in result:
        print(result["table"])
    if "choice" in result:
        print(json.dumps(result["choice"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
