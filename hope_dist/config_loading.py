"""Typed dataclasses from YAML and `--key.sub=value` overrides, and the key listing `--help` prints.

Generic over the dataclasses of hope_dist.config (which re-exports what its importers use): a value is
coerced by its field's type hint, `Literal` fields take one of their values (check_choices), a field's docstring is
the string literal on the line after it, and every error is a ConfigError naming the dotted key.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from typing import Any

import yaml

from hope_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key."""

    label = "config error"


RENAMED = {"model.chunk": "model.chunk_size", "model.proj_chunk": "model.proj_chunk_size",
           "model.cms[i].chunk": "model.cms[i].chunk_size", "parallel.microbatches": "parallel.pp_microbatches"}
"""Keys renamed since earlier configs: the unknown-key error names the new one."""


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, args[0], value)
    if origin is typing.Literal:  # the section's __post_init__ checks it (check_choices)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        try:  # YAML reads yes/no/true/false as booleans: never take them for 1 and 0
            if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if tp is str:
        return str(value)
    return value


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    return {name: typing.get_args(tp) for name, tp in typing.get_type_hints(cls).items()
            if typing.get_origin(tp) is typing.Literal}


def check_choices(section: Any) -> None:
    """Every `Literal` field of a config section holds one of its choices, however it was built (YAML, an
    override or code); the message names the field (from_dict puts the section's prefix in front)."""
    for name, allowed in _choices(type(section)).items():
        value = getattr(section, name)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _unknown_key(full: str, names: set[str]) -> ConfigError:
    renamed = RENAMED.get(re.sub(r"\[\d+\]", "[i]", full))
    if renamed:
        index = re.search(r"\[\d+\]", full)
        new = renamed.replace("[i]", index.group()) if index else renamed
        return ConfigError(f"unknown config key {full!r}: it was renamed to {new!r}")
    return ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors naming the key.

    A section's `__post_init__` names the field it rejects; this adds the section's prefix."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise _unknown_key(full, names)
        kwargs[key] = _coerce(full, hints[key], value)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if not prefix:
            raise
        raise ConfigError(f"{prefix}.{e}") from None


def set_path(tree: dict, dotted: str, value: str) -> None:
    """Put the override `--dotted=value` (a YAML value) into the nested dict `tree`."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = load_yaml(value, f"--{dotted}={value!r}") if value != "" else ""


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with an error naming `where` (a file or an override) and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at} ({problem}): close its brackets and quotes, or quote "
                          f"the whole value") from None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal on the line after it in the class body), by name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, doc in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[node.target.id] = " ".join(doc.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return "null" if tp is type(None) else tp.__name__


def _yaml(value: Any) -> str:
    """`value` as a one-line YAML value; a list of sections shows the fields that differ from their defaults."""
    if value and isinstance(value, list) and dataclasses.is_dataclass(value[0]):
        rows, defaults = [dataclasses.asdict(v) for v in value], dataclasses.asdict(type(value[0])())
        keep = [k for k in defaults if any(row[k] != defaults[k] for row in rows)]
        value = [{k: row[k] for k in keep} for row in rows]
    return yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).removesuffix("...\n").strip()


def key_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, `type = default`, docstring) for every field of `cls`, sections and list items recursed."""
    hints, docs, rows = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += key_rows(tp, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((key, f"{_type_name(tp)} = {_yaml(default)}", docs.get(f.name, "")))
        (item,) = typing.get_args(tp) if typing.get_origin(tp) is list else (None,)
        if dataclasses.is_dataclass(item):
            rows += key_rows(item, key + "[i].")
    return rows


def help_text(cls: type, usage: str) -> str:
    """`usage`, then every key of `cls` grouped by section: key, type = default, meaning."""
    rows = key_rows(cls)
    width = max(len(key) for key, _, _ in rows)
    typed_width = max(len(typed) for _, typed, _ in rows if len(typed) <= 40)
    lines = [usage, "", "Every key can be set in the YAML file or overridden with --key.sub=value (a YAML value).",
             "KEY, TYPE = DEFAULT, MEANING:"]
    section = ""
    for key, typed, doc in rows:
        head = key.split(".")[0] if "." in key else None
        if head != section:
            section = head
            lines += [""] + ([f"{head}: {field_docs(cls).get(head, '')}".rstrip()] if head else [])
        lines.append(f"  {key:<{width}}  {typed:<{typed_width}}  {doc}".rstrip())
    return "\n".join(lines)
