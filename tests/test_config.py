"""Config loading: YAML + key=value overrides, unknown keys rejected with their path."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mm_moe.config import FFNConfig, apply_overrides, from_dict, load_config


@dataclass
class Model:
    d_model: int = 8
    ffn: FFNConfig = field(default_factory=FFNConfig)
    moe_ffn: FFNConfig | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("d_model: 16\nffn:\n  kind: smoe\n  num_experts: 4\nmoe_ffn:\n  kind: mhmoe\n  heads: 2\n")
    cfg = load_config(Model, path, ["ffn.top_k=1", "ffn.capacity_factor=1.25", "d_model=32"])
    assert cfg.d_model == 32
    assert cfg.ffn == FFNConfig(kind="smoe", num_experts=4, top_k=1, capacity_factor=1.25)
    assert cfg.moe_ffn.heads == 2 and isinstance(cfg.moe_ffn, FFNConfig)


def test_unknown_keys_are_rejected_with_their_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ffn:\n  kind: smoe\n  n_experts: 4\n")
    with pytest.raises(KeyError, match=r"bad.yaml.ffn: unknown key\(s\) \['n_experts'\]"):
        load_config(Model, path)
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides({}, ["ffn.top_k"])


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="top_k must be in"):
        from_dict(FFNConfig, {"kind": "smoe", "num_experts": 4, "top_k": 5})
    with pytest.raises(ValueError, match="capacity_factor"):
        FFNConfig(kind="smoe", capacity_factor=0)
