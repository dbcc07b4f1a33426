"""The package's layering, read from the source with `ast` (imports inside functions included): no import
circle between modules, and lower layers never import upper ones. And the CLIs answer --help, usage errors
and config errors before importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mm_moe"

# layer -> the layers it may import (config <- moe <- model <- eval / data <- engine <- inference <- analysis)
BASE = {"errors", "placement", "config", "config_files", "constants", "formats"}
ALLOWED = {
    "errors": set(),
    "placement": {"errors"},
    "config": {"errors", "placement"},
    "config_files": {"errors", "config"},
    "constants": set(),
    "formats": {"errors"},
    "moe": BASE,
    "model": BASE | {"moe"},
    "eval": BASE | {"moe", "model"},
    "data": BASE,
    "engine": BASE | {"moe", "model", "eval", "data"},
    "inference": BASE | {"moe", "model", "eval", "data", "engine"},
    "analysis": BASE | {"moe", "model", "eval", "data", "engine", "inference"},
    "export": BASE | {"moe", "model", "data", "engine"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every mm_moe module -> the mm_moe modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            edges |= {t for t in targets if t.split(".")[0] == "mm_moe"}
        unknown = edges - set(modules)
        assert not unknown, f"{name} imports unknown modules {unknown}"
        graph[name] = edges - {name}
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_lower_layers_never_import_upper_ones():
    graph = import_graph()
    assert set(ALLOWED) == {layer(m) for m in graph} - {"root"}, "a new top-level module needs a layer here"
    for module, imports in graph.items():
        if layer(module) == "root":
            assert not imports, "mm_moe/__init__ re-exports lazily; it imports nothing at import time"
            continue
        for target in imports:
            if layer(target) == layer(module):
                continue
            assert layer(target) in ALLOWED[layer(module)], f"{module} (layer {layer(module)}) imports {target}"


def test_the_layering_check_catches_a_violation(tmp_path, monkeypatch):
    """The graph really contains lazy (function-level) imports: a planted one is found."""
    fake = PKG / "moe" / "_planted_for_test.py"
    fake.write_text("def f():\n    from mm_moe.engine import trainer\n")
    try:
        assert "mm_moe.engine.trainer" in import_graph()["mm_moe.moe._planted_for_test"]
        with pytest.raises(AssertionError, match="layer moe"):
            test_lower_layers_never_import_upper_ones()
    finally:
        fake.unlink()


def test_every_package_declares_its_public_names():
    import importlib

    for init in PKG.rglob("__init__.py"):
        module = importlib.import_module(module_name(init))
        assert module.__all__, module.__name__
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


# which modules a CLI imported before it answered
_PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize("script,argv,expect", [
    ("train_mm.py", ["train_mm.py", "--help"], "usage:"),
    ("train_mm.py", ["train_mm.py", "pretrain", "--config", "configs/pretrain_demo.yaml", "train.steps=abc"],
     "config error: configs/pretrain_demo.yaml: train.steps: expected int >= 1, got 'abc'"),
    ("train_mm.py", ["train_mm.py", "finetune", "vqa", "--config", "configs/finetune_vqa_demo.yaml", "optim.lrr=1"],
     "did you mean 'lr'?"),
    ("train_mm.py", ["train_mm.py", "pretrain"], "the following arguments are required: --config"),
    ("eval_vqa.py", ["eval_vqa.py", "--help"], "usage:"),
    ("eval_vqa.py", ["eval_vqa.py", "--results", "r.json", "--questions", "q.json"], "--results needs --annotations"),
    ("eval_nlvr2.py", ["eval_nlvr2.py", "--help"], "usage:"),
    ("eval_caption.py", ["eval_caption.py", "--help"], "usage:"),
    ("eval_nlvr2.py", ["eval_nlvr2.py", "--ckpt", "runs/x", "--data", "d.json"], "--ckpt needs --images"),
])
def test_cli_answers_help_and_bad_input_without_importing_torch(script, argv, expect):
    probe = _PROBE.format(argv=argv, script=str(ROOT / script))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert expect in out.stdout + out.stderr, out.stdout + out.stderr
    assert out.stderr.strip().endswith("NO-TORCH"), out.stderr
