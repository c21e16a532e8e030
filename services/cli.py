"""``baton``: the single command-line entry.

    baton demo       serve one request end to end on a tiny random-weight model and print it
    baton generate   generate from a prompt with any model (HF directory or preset)
    baton serve      run a prefill or decode pod, or a router (gRPC)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time

from services.common.config import add_config_args, config_from, format_config
from services.engine.config import EngineConfig

log = logging.getLogger("baton")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _engine_config(args: argparse.Namespace, **defaults) -> EngineConfig:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    for key, value in defaults.items():
        flags.setdefault(key, value)
    config = config_from(EngineConfig, flags, yaml_path=args.config)
    log.info("%s", format_config(config))
    return config


async def _stream_completion(config: EngineConfig, prompt: str, max_tokens: int, temperature: float) -> None:
    from services.engine.async_engine import AsyncEngine
    from services.engine.engine import Engine
    from services.engine.request import SamplingParams

    engine = AsyncEngine(Engine(config))
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0)
    print(f"prompt: {prompt!r}", flush=True)
    print("completion: ", end="", flush=True)
    started = time.monotonic()
    first, tokens, last = None, [], None
    async for out in engine.generate(prompt, params):
        first = first or time.monotonic()
        tokens.extend(out.new_token_ids)
        print(out.new_text.encode("unicode_escape").decode("ascii"), end="", flush=True)
        last = out
    done = time.monotonic()
    print()
    print(f"token ids: {tokens}")
    print(
        f"finish: {last.finish_reason.value}, {len(tokens)} tokens, time to first token "
        f"{(first - started) * 1e3:.1f} ms, {len(tokens) / max(done - started, 1e-9):.1f} tok/s"
    )
    engine.shutdown()


def cmd_demo(args: argparse.Namespace) -> int:
    config = _engine_config(args, model="tiny-qwen3.5-moe", load_format="dummy")
    asyncio.run(_stream_completion(config, args.prompt, args.max_tokens, args.temperature))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = _engine_config(args)
    asyncio.run(_stream_completion(config, args.prompt, args.max_tokens, args.temperature))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.role == "prefill":
        from services.prefill.server import PrefillConfig as config_cls
        from services.prefill.server import serve
    elif args.role == "router":
        from services.router.config import RouterConfig as config_cls
        from services.router.server import serve
    else:
        from services.decode.server import DecodeConfig as config_cls
        from services.decode.server import serve
    flags = {k: v for k, v in vars(args).items() if v is not None}
    config = config_from(config_cls, flags, yaml_path=args.config)
    log.info("%s", format_config(config))
    status = 0
    with contextlib.suppress(KeyboardInterrupt):
        status = asyncio.run(serve(config))  # non-zero when the pod stopped because it could not serve
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (
        ("demo", cmd_demo, "one request end to end on a tiny random-weight model"),
        ("generate", cmd_generate, "generate from a prompt"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML file with EngineConfig fields")
        p.add_argument("--prompt", default="Baton hands the state over: ")
        p.add_argument("--max-tokens", type=int, default=32)
        p.add_argument("--temperature", type=float, default=0.8)
        add_config_args(p, EngineConfig)
        p.set_defaults(fn=fn)
    from services.decode.server import DecodeConfig
    from services.prefill.server import PrefillConfig
    from services.router.config import RouterConfig

    serve_parser = sub.add_parser("serve", help="run a pod or a router: baton serve prefill|decode|router")
    roles = serve_parser.add_subparsers(dest="role", required=True)
    for role, config_cls, what in (("prefill", PrefillConfig, "the prefill pod (gRPC)"),
                                   ("decode", DecodeConfig, "the decode pod (gRPC)"),
                                   ("router", RouterConfig, "the cache-aware router (gRPC, Redis)")):
        p = roles.add_parser(role, help=what)
        p.add_argument("--config", help=f"YAML file with {config_cls.__name__} fields")
        add_config_args(p, config_cls)
        p.set_defaults(fn=cmd_serve)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    fn = args.fn
    for key in ("fn", "command", "log_level"):
        delattr(args, key)
    return fn(args)



if __name__ == "__main__":
    sys.exit(main())
