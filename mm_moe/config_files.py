"""Config files: YAML files, section includes, `key=value` overrides, and validation of every value against the
annotation of its dataclass field (`mm_moe.config`).

Validation on load: numeric strings (YAML reads `1e-4` as a string) become numbers, a value of the wrong
type or out of its `Range` is rejected with its dotted key path, the expected type and the value given,
and an unknown key is rejected with the nearest valid one. It imports no torch: a CLI checks its config first.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from mm_moe.config import Range
from mm_moe.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        ranges = [m for m in meta if isinstance(m, Range)]
        bounds = ", ".join(f"{op} {b:g}" for r in ranges for op, b in
                           ((">=", r.ge), (">", r.gt), ("<=", r.le), ("<", r.lt)) if b is not None)
        return f"{_type_name(base)} {bounds}".strip()
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list of " + ", ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any, kind: type) -> Any:
    """`value` as an int or float when it is one (numbers, numeric strings), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError
    number = float(value) if isinstance(value, str) else value
    if kind is float:
        return float(number)
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError
        return int(number)
    return number


def _mismatch(where: str, tp: Any, value: Any, detail: str = "") -> ConfigError:
    """The error for `value` not fitting annotation `tp` at `where` (marked, so an enclosing union or Annotated
    can restate it with its own, fuller type)."""
    err = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{detail}")
    err.at, err.detail = where, detail
    return err


def _restated(err: ConfigError, where: str, tp: Any, value: Any) -> ConfigError:
    """A mismatch at `where` restated with the fuller type `tp`; an error inside a nested section as it is."""
    return _mismatch(where, tp, value, err.detail) if getattr(err, "at", None) == where else err


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked (and numbers converted) against annotation `tp`; ConfigError naming `where` otherwise."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        try:
            out = _coerce(value, base, where)
        except ConfigError as err:
            raise _restated(err, where, tp, value) from None
        for bound in (m for m in meta if isinstance(m, Range)):
            if (broken := bound.violated(out)) is not None:
                raise _mismatch(where, tp, value, f" (not {broken})")
        return out
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        *first, last = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in first:
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                if getattr(err, "at", None) != where:
                    raise
        try:
            return _coerce(value, last, where)
        except ConfigError as err:
            raise _restated(err, where, tp, value) from None
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _mismatch(where, tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, list | tuple):
                raise _mismatch(where, tp, value)
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise _mismatch(where, tp, value)
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _from_dict(tp, value, where)
        raise _mismatch(where, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(where, tp, value)
    if tp in (int, float):
        try:
            return _number(value, tp)
        except ValueError:
            raise _mismatch(where, tp, value) from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(where, tp, value, " (quote it in YAML)")
    if tp is Any:
        return value
    raise TypeError(f"{where}: no rule to check annotation {tp!r}")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{_join(where, str(key))}: unknown key for {cls.__name__}{hint} (valid: {', '.join(names)})")
    kwargs = {key: _coerce(value, hints[key], _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a check across fields: its message starts with the field's name
        raise ConfigError(_join(where, str(err))) from None


def _join(where: str, key: str) -> str:
    """The dotted path of `key` under `where` ("file.yaml:" is a root)."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def from_dict(cls: type[T], data: Any, where: str = "config:") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and value (ConfigError names the key path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {data!r}")
    return _from_dict(cls, data, where)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, returning a new dict, in order: after
    `model=configs/model/x.yaml`, `model.img_size=480` changes that file's section."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if isinstance(node.get(p), str) and node[p].endswith((".yaml", ".yml")):
                node[p] = read_yaml(node[p])  # a section included from a file (e.g. model=...yaml) takes overrides
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not YAML ({err})") from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {data!r}")
    return data


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it, mapping by mapping (a nested key changes only that key, as overrides do)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_includes(cls: type, data: dict[str, Any], where: str = "config:") -> dict[str, Any]:
    """A section given as a path to a YAML file (`model: configs/model/tiny.yaml`) is replaced by its content; a
    section mapping with an `include` key (`model: {include: configs/model/tiny.yaml, vision_stem: conv}`) is that
    file's content with the section's other keys laid over it."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        sub = _dataclass_in(hints[key]) if key in hints else None
        if sub is None:
            continue
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            value = read_yaml(value)
        if isinstance(value, dict) and "include" in value:
            path = value["include"]
            if not (isinstance(path, str) and path.endswith((".yaml", ".yml"))):
                raise ConfigError(f"{_join(where, key)}.include: expected the path of a YAML file, got {path!r}")
            value = _merged(read_yaml(path), {k: v for k, v in value.items() if k != "include"})
        if isinstance(value, dict):
            out[key] = _resolve_includes(sub, value, _join(where, key))
    return out


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside an annotation like `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (optional; sections may name other YAML files) plus `key=value` overrides."""
    where = f"{path or 'config'}:"
    data = _resolve_includes(cls, read_yaml(path), where) if path is not None else {}
    return from_dict(cls, _resolve_includes(cls, apply_overrides(data, overrides or []), where), where=where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataclass config (for config.yaml in run and checkpoint folders)."""
    return dataclasses.asdict(cfg)


__all__ = ["from_dict", "apply_overrides", "read_yaml", "load_config", "to_dict"]
