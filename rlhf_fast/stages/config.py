"""Typed stage configs from YAML sections and ``key=value`` overrides, for any dataclass.

``load_stage_config(SFTConfig, "configs/demo.yaml", "sft", ["learning_rate=3e-4", "max_steps=50"])``
reads the ``sft:`` section of the file, applies the overrides on top, checks every key against the
dataclass's init fields (an unknown key raises naming the source, the valid keys and the closest
match), converts every value to the field's annotated type (int, float, bool, str, None, list[...],
dict, Literal[...], Enum, and unions of these) and returns ``cls(**values)``. Nothing here knows
about a particular stage: the PPO stage passes its own config class.

Why convert YAML values too: PyYAML reads ``1e-4`` as the *string* "1e-4" (YAML 1.1), so a float
field must accept numeric strings from the file as well as from the command line.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError", "config_fields", "load_stage_config", "parse_overrides", "coerce_value",
    "config_to_dict", "describe_fields", "read_yaml_section",
]


class ConfigError(ValueError):
    """A configuration file, section, key or value is wrong; the message names which and the fix."""


_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}
_NULL = {"null", "~", "None"}


def _means_none(value: Any, allow_none_word: bool) -> bool:
    """None, "null", "~", "None"; also "none" and "" unless the field can hold a string.

    Why the exception: for ``str | None`` fields a lowercase "none" is often a real value
    (transformers' ``report_to=none``), so only the YAML spellings of null mean None there.
    """
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    text = value.strip()
    return text in _NULL or (allow_none_word and text.lower() in ("none", ""))


def config_fields(cls) -> dict[str, Any]:
    """``{name: resolved type}`` of the dataclass's init fields (the keys a config may set)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config class must be a dataclass, got {cls!r}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _unknown_key_error(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = sorted(valid)
    listing = ", ".join(valid) if len(valid) <= 60 else ", ".join(valid[:60]) + f", ... ({len(valid)} keys)"
    return ConfigError(f"unknown config key {key!r} in {where}.{_suggest(key, valid)} Valid keys: {listing}")


def coerce_value(value: Any, tp: Any, key: str = "value") -> Any:
    """``value`` (a YAML value or a command-line string) converted to type ``tp``; ConfigError if impossible.

    None is written ``null``, ``~`` or ``None`` (and ``none`` or an empty value for fields that
    cannot hold a string); lists as ``[1, 2]`` or ``a,b,c``; dicts as JSON/YAML ``{"k": 1}``.
    """
    try:
        return _coerce(value, tp)
    except _CoerceError as e:
        raise ConfigError(f"config key {key!r}: cannot use {value!r} as {_type_name(tp)} ({e})") from None


class _CoerceError(ValueError):
    pass


def _parse_yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any) -> Any:
    if tp is Any or tp is object or tp is dataclasses.MISSING:
        return _parse_yaml_scalar(value) if isinstance(value, str) else value
    if isinstance(tp, str):  # an annotation we could not resolve: pass through as YAML would
        return _parse_yaml_scalar(value) if isinstance(value, str) else value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        if type(None) in args and _means_none(value, allow_none_word=str not in members):
            return None
        # str last, so "3" into `int | str` becomes 3 and "auto" into `float | str` stays "auto".
        ordered = [a for a in members if a is not str] + [a for a in members if a is str]
        errors = []
        for member in ordered:
            try:
                return _coerce(value, member)
            except _CoerceError as e:
                errors.append(str(e))
        raise _CoerceError("; ".join(errors) or "no matching type")
    if tp is type(None):
        if _means_none(value, allow_none_word=True):
            return None
        raise _CoerceError("expected None")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and str(choice) == value):
                return choice
            if value is None and choice is None:
                return None
        raise _CoerceError(f"expected one of {', '.join(repr(a) for a in args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _CoerceError("expected true/false")
    if tp is int:
        if isinstance(value, bool):
            raise _CoerceError("expected an integer, got a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    f = float(text)
                except ValueError:
                    raise _CoerceError("expected an integer") from None
                if f.is_integer():
                    return int(f)
        raise _CoerceError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise _CoerceError("expected a number, got a boolean")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _CoerceError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _CoerceError("expected a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member or value == member.value or value == member.name:
                return member
        raise _CoerceError(f"expected one of {', '.join(repr(m.value) for m in tp)}")
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        seq = value
        if isinstance(value, str):
            parsed = _parse_yaml_scalar(value) if value.strip().startswith("[") else None
            seq = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(seq, (list, tuple)):
            raise _CoerceError("expected a list")
        item_tp = args[0] if args else Any
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(seq):
                raise _CoerceError(f"expected {len(args)} items")
            return tuple(_coerce(v, a) for v, a in zip(seq, args))
        out = [_coerce(v, item_tp) for v in seq]
        return tuple(out) if (tp is tuple or origin is tuple) else out
    if tp is dict or origin is dict:
        mapping = value
        if isinstance(value, str):
            try:
                mapping = json.loads(value)
            except json.JSONDecodeError:
                mapping = _parse_yaml_scalar(value)
        if not isinstance(mapping, dict):
            raise _CoerceError("expected a mapping")
        if len(args) == 2:
            return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in mapping.items()}
        return dict(mapping)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _CoerceError(f"expected {tp.__name__}")
    # Other typing constructs (Callable, TypeVar, ...): pass through.
    return _parse_yaml_scalar(value) if isinstance(value, str) else value


def parse_overrides(overrides: Iterable[str] | dict | None) -> dict[str, str]:
    """``["a=1", "b.c=x"]`` -> ``{"a": "1", "b.c": "x"}`` (values stay strings until typed)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out: dict[str, str] = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. learning_rate=1e-4)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key; write key=value")
        out[key] = value
    return out


def read_yaml_section(yaml_path: str | os.PathLike, section: str | None) -> dict:
    """The mapping under ``section`` of a YAML file (the whole file when ``section`` is None)."""
    path = Path(yaml_path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    if section is None:
        return data
    if section not in data:
        present = ", ".join(repr(k) for k in data) or "none"
        raise ConfigError(
            f"config file {str(path)!r} has no {section!r} section (sections present: {present}); "
            f"add '{section}:' with the stage's settings"
        )
    values = data[section]
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} of {str(path)!r} must be a mapping of key: value")
    return values


def load_stage_config(
    cls,
    yaml_path: str | os.PathLike | None = None,
    section: str | None = None,
    overrides: Iterable[str] | dict | None = None,
    **defaults: Any,
):
    """An instance of dataclass ``cls`` from ``defaults`` < YAML ``section`` < ``overrides`` (later wins).

    overrides: ``["key=value", ...]`` strings (or a dict). Every key must be an init field of ``cls``;
    every value is converted to the field's type. Raises ConfigError naming the file/section or the
    override, the key, the valid keys and the nearest match.
    """
    fields = config_fields(cls)
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict]] = [("keyword arguments", defaults)]
    if yaml_path is not None:
        where = f"{os.fspath(yaml_path)}" + (f" section {section!r}" if section else "")
        sources.append((where, read_yaml_section(yaml_path, section)))
    sources.append(("command-line overrides", parse_overrides(overrides)))
    for where, mapping in sources:
        for key, raw in mapping.items():
            if not isinstance(key, str) or key not in fields:
                raise _unknown_key_error(str(key), fields, where)
            values[key] = coerce_value(raw, fields[key], key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}") from e


def config_to_dict(config) -> dict:
    """Init fields of a config dataclass as plain JSON/YAML-friendly values."""
    out = {}
    for name in config_fields(type(config)):
        v = getattr(config, name)
        if isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):  # e.g. TrainingArguments' AcceleratorConfig
            v = {k: (x.value if isinstance(x, enum.Enum) else x) for k, x in dataclasses.asdict(v).items()}
        out[name] = v
    return out


def describe_fields(cls) -> str:
    """One line per settable key: ``name (type, default X): help``; used by ``rlhf-fast <stage> --help``."""
    lines = []
    hints = config_fields(cls)
    # The stage's own keys first, then those it shares with other stages through a dataclass base.
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited)
    for f in ordered:
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        help_text = f.metadata.get("help", "") if f.metadata else ""
        lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}){': ' + help_text if help_text else ''}")
    return "\n".join(lines)
