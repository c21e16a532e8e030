"""Build a process's config dataclass from flags, environment and an optional YAML file.

Precedence, highest first: command-line flags, ``BATON_<FIELD>`` environment variables, the YAML file
given by ``--config``, the dataclass defaults. Every field becomes a ``--field-name`` flag whose help is
the field's ``metadata["help"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
import urllib.parse
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


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _prefix(field: dataclasses.Field, prefix: str) -> str:
    """Nested config fields are flags of their own, prefixed by the field's name (``transfer`` ->
    ``--transfer-hostname``) unless marked ``flatten`` (the engine's settings read better unprefixed)."""
    return prefix if field.metadata.get("flatten") else f"{prefix}{field.name}_"


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One ``--field-name`` flag per field (default None, so unset flags don't override lower sources)."""
    group = parser.add_argument_group(cls.__name__)
    for field, kind in _fields(cls):
        if dataclasses.is_dataclass(kind):
            add_config_args(parser, kind, _prefix(field, prefix))
            continue
        name = prefix + field.name
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_converter(field),
            default=None,
            help=f"{field.metadata.get('help', '')} (default: {field.default})",
        )


def config_from(cls: type[T], flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
                yaml_path: str | None = None) -> T:
    """``flags`` and the YAML file use the flat flag names (``transfer_hostname``)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    unknown = sorted(set(values) - _all_names(cls))
    if unknown:
        raise ValueError(f"{yaml_path}: unknown config fields {unknown}")
    return _build(cls, values, flags, env)


def _all_names(cls: type, prefix: str = "") -> set[str]:
    names = set()
    for field, kind in _fields(cls):
        if dataclasses.is_dataclass(kind):
            names |= _all_names(kind, _prefix(field, prefix))
        else:
            names.add(prefix + field.name)
    return names


def _build(cls: type[T], yaml_values: dict[str, Any], flags: Mapping[str, Any], env: Mapping[str, str],
           prefix: str = "") -> T:
    values: dict[str, Any] = {}
    for field, kind in _fields(cls):
        if dataclasses.is_dataclass(kind):
            values[field.name] = _build(kind, yaml_values, flags, env, _prefix(field, prefix))
            continue
        name = prefix + field.name
        if name in yaml_values:
            values[field.name] = yaml_values[name]
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[field.name] = _converter(field)(raw)
        if flags.get(name) is not None:
            values[field.name] = flags[name]
    return cls(**values)


def format_config(config: Any, indent: str = "  ") -> str:
    """One ``name = value`` line per field, for the log at start-up."""
    lines = [f"{type(config).__name__}:"]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines.append(indent + format_config(value, indent + "  ").replace("\n", "\n"))
        elif field.metadata.get("secret") and value:
            lines.append(f"{indent}{field.name} = <redacted>")
        else:
            lines.append(f"{indent}{field.name} = {redact_url(value)!r}")
    return "\n".join(lines)


def redact_url(value: Any) -> Any:
    """A URL's password replaced (``redis://:secret@host`` -> ``redis://:***@host``), for logs; anything else as is."""
    if not isinstance(value, str) or "://" not in value or "@" not in value:
        return value
    parts = urllib.parse.urlsplit(value)
    if parts.password is None:
        return value
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
