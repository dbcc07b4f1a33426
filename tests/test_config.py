"""Config loading: YAML + key=value overrides, values checked against their annotations (numeric strings
become numbers; wrong types, out-of-range values and unknown keys are rejected with their dotted path)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from mm_moe.config import BEiT3Config, FFNConfig, RunConfig
from mm_moe.config_files import apply_overrides, from_dict, load_config, to_dict
from mm_moe.errors import ConfigError


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


def test_a_section_includes_a_file_and_changes_some_of_its_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("d_model: 16\nffn: {kind: smoe, num_experts: 4, top_k: 2}\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{include: {tmp_path / 'base.yaml'}, ffn: {{top_k: 1}}}}\n")

    @dataclass
    class Run:
        model: Model = field(default_factory=Model)

    cfg = load_config(Run, path, ["model.d_model=32"])
    # the nested ffn mapping changes top_k only; kind and num_experts stay the file's
    assert cfg.model == Model(d_model=32, ffn=FFNConfig(kind="smoe", num_experts=4, top_k=1))
    assert load_config(Run, path).model.d_model == 16
    path.write_text("model: {include: 3, d_model: 8}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: model.include: expected the path of a YAML file, got 3"):
        load_config(Run, path)
    path.write_text(f"model: {{include: {tmp_path / 'nope.yaml'}}}\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        load_config(Run, path)


def test_numeric_strings_become_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 and 3e2 as strings: the CLI help's own example
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 1e-4}\ntrain: {steps: 3e2}\n")
    cfg = load_config(RunConfig, path, ["optim.betas=[0.9, '0.95']", "model.drop_path=0"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 300 and isinstance(cfg.train.steps, int)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.drop_path == 0.0 and isinstance(cfg.model.drop_path, float)
    assert load_config(RunConfig, None, ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("override,message", [
    ("train.steps=abc", "config: train.steps: expected int >= 1, got 'abc'"),
    ("train.steps=2.5", "config: train.steps: expected int >= 1, got 2.5"),
    ("train.steps=0", "config: train.steps: expected int >= 1, got 0 (not >= 1)"),
    ("train.steps=true", "config: train.steps: expected int >= 1, got True"),
    ("optim.lr=-1", "config: optim.lr: expected float > 0, got -1 (not > 0)"),
    ("train.keep_last=0", "config: train.keep_last: expected int >= 1, got 0"),
    ("train.ckpt_every=0", "config: train.ckpt_every: expected int >= 1, got 0"),
    ("train.ema_decay=1.5", "config: train.ema_decay: expected float > 0, < 1 or null, got 1.5"),
    ("train.precision=fp16", "config: train.precision: expected one of 'fp32', 'bf16', 'auto', got 'fp16'"),
    ("train.expert_parallel=yes please", "config: train.expert_parallel: expected bool, got 'yes please'"),
    ("run_dir=123", "config: run_dir: expected str, got 123 (quote it in YAML)"),
    ("optim.betas=[0.9]", "config: optim.betas: expected a list of float, float, got [0.9]"),
    ("model.moe.kind=moe", "config: model.moe.kind: expected one of 'dense', 'smoe', 'xmoe', 'mhmoe', 'cartesian'"),
    ("model.heads=5", "config: model.heads: expected a divisor of d_model=768, got 5"),
    ("model.moe_layers=top13", "config: model.moe_layers: expected none, all, every_other, every_other_even, top<N>"),
    ("train.stpes=10", "config: train.stpes: unknown key for TrainConfig; did you mean 'steps'?"),
    ("optim=3", "config: optim: expected OptimConfig, got 3"),
    ("data.train_crop_scale=0", "config: data.train_crop_scale: expected float > 0, <= 1, got 0"),
])
def test_bad_values_name_their_key_the_expected_type_and_the_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ffn:\n  kind: smoe\n  n_experts: 4\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: ffn.n_experts: unknown key for FFNConfig; did you mean 'num_experts'\?"):
        load_config(Model, bad)
    bad.write_text("train: {steps: 1\n")
    unclosed = rf"^{bad}: not valid YAML at line 2, column 1: expected ',' or '}}', but got '<stream end>'$"
    with pytest.raises(ConfigError, match=unclosed):
        load_config(RunConfig, bad)
    bad.write_text("just a string\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: expected a mapping of config sections, got 'just a string'"):
        load_config(RunConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["ffn.top_k"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"^config: top_k: expected at most num_experts=4, got 5"):
        from_dict(FFNConfig, {"kind": "smoe", "num_experts": 4, "top_k": 5})
    with pytest.raises(ConfigError, match=r"^config: model.moe.top_k: expected at most num_experts=2, got 3"):
        load_config(RunConfig, None, ["model.moe={kind: smoe, num_experts: 2, top_k: 3}"])


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        cfg = load_config(RunConfig, path)
        again = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
        assert again == cfg, path
    for path in sorted((root / "configs" / "model").glob("*.yaml")):
        assert isinstance(load_config(BEiT3Config, path), BEiT3Config)


def test_every_run_config_field_has_a_docstring():
    import ast
    import inspect

    import mm_moe.config as module

    tree = ast.parse(inspect.getsource(module))
    for node in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")
                 and dataclasses.is_dataclass(getattr(module, n.name))):
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                doc = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), \
                    f"{node.name}.{stmt.target.id} has no docstring line"
