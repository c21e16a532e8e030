"""Run a benchmark module with module-level settings overridden, for A/B runs on the GPU machine.

    python -m loadtest.run_with_settings \
        --set "services.engine.ops._GATED_NORM_DECODE_BATCHES=range(1, 17)" \
        -- loadtest.bench_batch_decode --batches 1,8 --contexts 4096 --out ab_on.json

Each ``--set module.NAME=VALUE`` imports the module and assigns VALUE (a Python literal or ``range(...)``) to its
attribute NAME, which must exist, before the benchmark module runs as ``__main__`` with the arguments after ``--``.
The engine reads such settings when it builds its kernel set or at each call (see the settings' comments), so
they apply to the engines the benchmark builds.
"""

from __future__ import annotations

import ast
import importlib
import runpy
import sys


def parse_value(text: str):
    """A Python literal, or ``range(a[, b[, step]])`` of integer literals."""
    tree = ast.parse(text.strip(), mode="eval").body
    if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "range" and not tree.keywords:
        return range(*(ast.literal_eval(arg) for arg in tree.args))
    return ast.literal_eval(tree)


def apply_setting(assignment: str) -> None:
    """``module.NAME=VALUE``: set an existing module attribute (a typo fails instead of setting nothing)."""
    target, sep, value = assignment.partition("=")
    module_name, dot, name = target.strip().rpartition(".")
    if not sep or not dot:
        raise SystemExit(f"--set takes module.NAME=VALUE, got {assignment!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise SystemExit(f"{module_name} has no setting {name!r}")
    setattr(module, name, parse_value(value))
    print(f"setting {module_name}.{name} = {getattr(module, name)!r}", flush=True)


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    if not command or len(options) % 2 or any(flag != "--set" for flag in options[::2]):
        raise SystemExit(__doc__)
    for assignment in options[1::2]:
        apply_setting(assignment)
    sys.argv = [command[0], *command[1:]]
    runpy.run_module(command[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
