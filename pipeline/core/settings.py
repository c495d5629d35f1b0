"""Settings that come from outside (`--set key=value` text, a saved config.json), read the one way.

A run config is a tree of dataclasses (pipeline.config). Every value entering it from outside is checked here
against its field's type hint, so a wrong value is refused with the setting's name instead of failing deep inside
a stage: `int` (an integer; "1e5" is fine as text, 1.5, true or "8" are not), `float` (a finite number: nan and
inf are refused), `bool`, `str`, and `Literal[...]` (one of the listed names: the place where a string setting
declares its choices, next to its field). A section (`data`, `model`, `predict`) is set key by key, never
replaced by a scalar. Bounds and the relations between settings belong to the config itself
(pipeline.config.check_config); both run for every command before it changes anything.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Literal

from pipeline.core.errors import ConfigError

INT_LIMIT = 2**31 - 1  # no integer setting needs more; larger ones only fail later, in numpy or torch


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(hint: Any) -> tuple[str, ...] | None:
    """The allowed names of a Literal[...] setting, else None."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def describe(hint: Any) -> str:
    names = choices(hint)
    if names is not None:
        return "one of " + ", ".join(names)
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "text"}.get(hint, str(hint))


def value_problem(value: Any, hint: Any) -> str | None:
    """Why `value` (as read from JSON, or parsed from text) cannot be this setting; None when it can."""
    names = choices(hint)
    if names is not None:
        ok = isinstance(value, str) and value in names
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and abs(value) > INT_LIMIT:
            return f"{value} is out of range (at most {INT_LIMIT:,} in size)"
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
    elif hint is str:
        ok = isinstance(value, str)
    else:
        return None
    return None if ok else f"expected {describe(hint)}, got {_shown(value)}"


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a JSON {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def parse_text(text: str, hint: Any) -> Any:
    """Command-line text -> a value of the setting's type; ConfigError-free: returns the text itself when it
    cannot be converted, so that value_problem names what was given."""
    if hint is bool:
        low = text.strip().lower()
        return {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}.get(low, text)
    if hint is int:
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)  # "1e5"
            except ValueError:
                return text
            return int(number) if number.is_integer() else text
    if hint is float:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def _section_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def locate(cfg: Any, key: str) -> tuple[Any, str, Any]:
    """(the dataclass holding the setting, its field name, its type hint) for a dotted key."""
    target = cfg
    *sections, name = key.strip().split(".")
    for i, part in enumerate(sections):
        if not (dataclasses.is_dataclass(target) and part in {f.name for f in dataclasses.fields(target)}
                and dataclasses.is_dataclass(getattr(target, part))):
            where = ".".join(sections[:i + 1])
            raise ConfigError(f"--set {key}: no section {where!r}")
        target = getattr(target, part)
    hints = field_hints(type(target))
    if name not in hints:
        raise ConfigError(f"--set {key}: unknown setting; known: {', '.join(sorted(hints))}")
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"--set {key}: is a section ({_section_names(hint)}), not one setting; set its settings "
                          f"one by one, e.g. --set {key}.{dataclasses.fields(hint)[0].name}=...")
    return target, name, hint


def apply_settings(cfg: Any, items: list[str]) -> list[str]:
    """Apply `key=value` strings to the config in place; returns the keys set. Every problem is one ConfigError
    naming the setting and what was expected."""
    keys = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        target, name, hint = locate(cfg, key)
        value = parse_text(text, hint)
        problem = value_problem(value, hint)
        if problem and value is text:  # not converted: say what was given, as given
            problem = f"expected {describe(hint)}, got {text!r}"
        if problem:
            raise ConfigError(f"--set {key}: {problem}")
        setattr(target, name, value)
        keys.append(key)
    return keys


def build(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    """A dataclass tree from a JSON object, every value checked; missing settings keep their defaults (a file
    written before a setting existed), unknown ones are errors (a file of something else, or a typo)."""
    if not isinstance(data, dict):
        what = f"setting {prefix.rstrip('.')!r}" if prefix else "the file"
        raise ConfigError(f"{where}: {what} should be a JSON object of settings, got {_shown(data)}")
    hints = field_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown setting {prefix + key!r}; known: {', '.join(sorted(hints))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build(hint, value, where, f"{prefix}{key}.")
            continue
        problem = value_problem(value, hint)
        if problem:
            raise ConfigError(f"{where}: {prefix}{key}: {problem}")
        values[key] = float(value) if hint is float else value
    return cls(**values)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of a config tree (dataclasses, or their JSON form) by dotted key."""
    items = cfg.items() if isinstance(cfg, dict) else ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    out: dict[str, Any] = {}
    for name, value in items:
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out
