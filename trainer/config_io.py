"""Config files into typed dataclasses: TOML / JSON reading, `--set` overrides, and the conversion of plain
dicts into nested dataclasses (tuples, optionals) with errors that name the key as the file spells it
(`ConfigError`). The trainer's config classes live in `config.py`, which re-exports these names.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

# Keys that moved: the message a config that still has one gets
MOVED_KEYS = {"data.ref_clip_frames": "moved to [layout] max_clip_frames (the longest reference clip is part of "
                                      "the conditioning layout, which the engine reads from the LoRA: training "
                                      "and inference keep the same clips)"}
# the [section] tables of a config file (the rest are top-level keys)
SECTIONS = ("model", "data", "lora", "optim", "validation", "layout")
_UNSET = object()


def show_key(key: str) -> str:
    """A dotted field name as a config file spells it: "validation.references[0]" -> "[validation] references[0]",
    "max_steps" -> "max_steps", "layout" -> "[layout]"."""
    head, dot, rest = key.partition(".")
    if dot:
        return f"[{head}] {rest}"
    return f"[{key}]" if key in SECTIONS else key


def show_value(value: Any) -> str:
    """A value as TOML / JSON writes it (strings quoted, tuples as lists, true / false)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key as the file spells it, the value and the
    problem: `[validation] references[0] = "refs/face.png": file not found`. The CLI exits with code 2."""

    def __init__(self, key: str, problem: str, value: Any = _UNSET):
        self.key, self.problem = key, problem
        shown = show_key(key) if key else "config"
        if value is not _UNSET:
            shown += f" = {show_value(value)}"
        super().__init__(f"{shown}: {problem}")


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------------------

def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(where, "must not be null", value)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(where, " or ".join(e.problem for e in errors), value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(where, f"must be a table [{where}] / an object, got {type(value).__name__}", value)
        return from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, "must be a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(where, f"must have {len(args)} entries, got {len(value)}", value)
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, "must be true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, "must be an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(where, "must be a finite number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, "must be a string", value)
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict (nested dataclasses, tuples, optionals). `where` is the dotted
    name of the section ("" for the top level); every error is a `ConfigError` naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k in data:
        moved = MOVED_KEYS.get(f"{where}.{k}" if where else k)
        if moved is not None and k not in names:
            raise ConfigError(f"{where}.{k}" if where else k, moved, data[k])
        if k not in names:
            raise ConfigError(f"{where}.{k}" if where else k,
                              f"unknown key; the keys {f'of [{where}] ' if where else ''}are {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. ConditioningLayout's own checks: name the section
        raise ConfigError(where, str(e)) from None


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"--set: {k} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """`["optim.lr=5e-5", "model.path=/m"]`: values are parsed as JSON when they parse, else kept as strings."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE (e.g. optim.lr=5e-5), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return data


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
    raise ValueError(f"{path}: config files must end in .toml or .json")


def load_config(path: str | Path, cls: type, overrides: list[str] | None = None) -> Any:
    """Read a .toml / .json file into `cls` (SFTConfig or DPOConfig), after `--set` overrides."""
    return from_dict(cls, apply_overrides(read_config_file(path), overrides))


__all__ = ["SECTIONS", "MOVED_KEYS", "ConfigError", "show_key", "show_value", "from_dict", "to_dict", "apply_overrides",
           "read_config_file", "load_config"]
