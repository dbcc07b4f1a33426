"""Typed dataclass configs with YAML loading and `key=value` overrides; unknown keys are rejected."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

FFNKind = Literal["dense", "smoe", "xmoe", "mhmoe", "cartesian"]
Activation = Literal["gelu", "swiglu"]
RouterKind = Literal["linear", "xmoe"]


@dataclass
class FFNConfig:
    """One feed-forward layer: dense, or one of the MoE variants built by `build_ffn`.

    `hidden` is the inner size of the dense FFN, or of each (sub-)expert for MoE kinds.
    `subln` puts a LayerNorm over the hidden units before the output projection (torchscale's sub-LN).
    For "cartesian", `num_experts`, `top_k` and `num_shared_experts` apply to each of the
    two sub-expert groups A and B.
    """

    kind: FFNKind = "dense"
    hidden: int = 3072
    activation: Activation = "gelu"
    bias: bool = True
    subln: bool = False
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0
    shared_hidden: int | None = None
    heads: int = 1
    router: RouterKind | None = None
    router_dim: int = 16
    renormalize: bool = False
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    dispatch: Literal["auto", "grouped_mm", "loop"] = "auto"

    def __post_init__(self) -> None:
        if self.kind != "dense" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"FFNConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.heads < 1:
            raise ValueError(f"FFNConfig.heads must be >= 1, got {self.heads}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"FFNConfig.capacity_factor must be > 0 or None, got {self.capacity_factor}")

    @property
    def router_kind(self) -> RouterKind:
        """The router actually used: explicit `router`, else X-MoE style for xmoe/mhmoe (as in the official code)."""
        if self.router is not None:
            return self.router
        return "xmoe" if self.kind in ("xmoe", "mhmoe") else "linear"


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the offending path."""
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; expected some of {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_in(hints[key])
        kwargs[key] = from_dict(sub, value, f"{where}.{key}") if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside an annotation like `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, returning a new dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise KeyError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def _resolve_includes(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A section given as a path to a YAML file (e.g. `model: configs/model/tiny.yaml`) is replaced by its content."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        sub = _dataclass_in(hints[key]) if key in hints else None
        if sub is None:
            continue
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            value = _read_yaml(value)
        if isinstance(value, dict):
            out[key] = _resolve_includes(sub, value)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (optional; sections may name other YAML files) plus `key=value` overrides."""
    data = _resolve_includes(cls, _read_yaml(path)) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or []), where=str(path or "config"))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataclass config (for config.yaml in run and checkpoint folders)."""
    return dataclasses.asdict(cfg)


__all__ = ["FFNConfig", "from_dict", "apply_overrides", "load_config", "to_dict"]
