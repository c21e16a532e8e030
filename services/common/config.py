"""Build a process's config dataclass from flags, environment and an optional YAML file.

Precedence, highest first: command-line flags, ``BATON_<FIELD>`` environment variables, the YAML file
given by ``--config``, the dataclass defaults. Every field becomes a ``--field-name`` flag whose help is
the field's ``metadata["help"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
ENV_PREFIX = "BATON_"


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(field: dataclasses.Field):
    kind = type(field.default) if field.default is not dataclasses.MISSING else str
    if kind is bool:
        return _parse_bool
    if kind in (int, float, str):
        return kind
    raise TypeError(f"config field {field.name} has unsupported type {kind.__name__}")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field (default None, so unset flags don't override lower sources)."""
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_converter(field),
            default=None,
            help=f"{field.metadata.get('help', '')} (default: {field.default})",
        )


def config_from(cls: type[T], flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
                yaml_path: str | None = None) -> T:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{yaml_path}: unknown config fields {unknown}")
    for name, field in names.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _converter(field)(raw)
        if flags.get(name) is not None:
            values[name] = flags[name]
    return cls(**values)


def format_config(config: Any) -> str:
    """One ``name = value`` line per field, for the log at start-up."""
    title = type(config).__name__
    lines = [f"{title}:"] + [f"  {f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)]
    return "\n".join(lines)
