"""Chat templates: a model's Jinja template rendered exactly as ``transformers``' ``apply_chat_template`` renders
it (the same sandboxed environment, filters and globals, the tokenizer's named special tokens as variables), so
a conversation sent to Baton becomes the prompt the model was trained on.

Templates come from the model directory and are untrusted code: they run in Jinja's immutable sandbox, and what
they see is rebuilt from plain JSON values.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (a bad message, or the template refused it): a client error."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the class itself (no type hackery)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without dunder attributes (no way into CPython internals from a template)."""

    def __init__(*args, **kwargs):  # noqa: N805  (Jinja's own signature trick: ``namespace(self=...)`` works)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any) -> Any:
    """What a template may see: JSON scalars, dicts and lists rebuilt from the request (no live objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


class ChatTemplate:
    """One compiled template and the special tokens it may refer to (``bos_token``, ``eos_token``, ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ValueError(f"chat template does not compile: {err}") from err
        self.source = source
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **kwargs: Any) -> str:
        """Raises ChatTemplateError naming what is wrong with the conversation."""
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(messages=_plain(messages), tools=_plain(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as err:  # raise_exception() in the template, or a sandbox refusal
            raise ChatTemplateError(f"chat template refused the conversation: {err}") from err
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise ChatTemplateError(f"chat template failed on this conversation: {err}") from err

    @classmethod
    def from_dir(cls, directory: Path, tokenizer_config: dict, special_tokens: dict[str, str]) -> ChatTemplate | None:
        """The directory's template: ``chat_template.jinja`` (transformers' current layout), else the
        ``chat_template`` of ``tokenizer_config.json`` (a string, or named templates with a ``default``), else
        ``chat_template.json``. None if the model has none."""
        source: Any = None
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text()
        elif tokenizer_config.get("chat_template") is not None:
            source = tokenizer_config["chat_template"]
        elif (directory / "chat_template.json").is_file():
            source = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
            if source is None:
                raise ValueError(f"{directory}: several chat templates and none named 'default': {sorted(named)}")
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{directory}: chat_template must be a string, got {type(source).__name__}")
        return cls(source, special_tokens)
