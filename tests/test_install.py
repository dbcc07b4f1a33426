"""The package installs beside a cluster image's own torch: pyproject declares version ranges, `make` installs the
tested pins of constraints.txt, and pip resolving our dependencies keeps an older torch that is already there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TORCH = {"torch": ("2.11.0", None), "torchvision": ("0.26.0", "torch==2.11.0")}  # the H200 image's pair


def declared() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {(r := Requirement(d)).name: r for d in deps}


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_ranges_not_pins_and_the_tested_pins_lie_in_them() -> None:
    """torch and torchvision are ranges in pyproject; constraints.txt pins exactly one version of each, inside
    the range, and the README names those tested versions; the Makefile installs with the constraints."""
    deps, tested = declared(), pins()
    for name in ("torch", "torchvision"):
        spec = deps[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned in pyproject.toml: {spec}"
        assert spec.contains(IMAGE_TORCH[name][0]), f"{name} {spec} refuses the cluster image's {IMAGE_TORCH[name][0]}"
        assert spec.contains(tested[name]), f"constraints.txt's {name}=={tested[name]} lies outside {spec}"
        assert f"{name}=={tested[name]}" in (ROOT / "README.md").read_text()
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">=3.11,<3.14"
    assert re.search(r"pip install .*-c constraints\.txt", (ROOT / "Makefile").read_text())


def fake_image(path: Path) -> Path:
    """A bare environment holding only the metadata of the image's torch and torchvision, as pip sees an image that
    brings its own CUDA build; returns its python."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, (version, requires) in IMAGE_TORCH.items():
        info = Path(site) / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        (info / "METADATA").write_text(meta + (f"Requires-Dist: {requires}\n" if requires else ""))
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return python


@pytest.mark.slow
def test_resolving_our_dependencies_keeps_the_image_torch(tmp_path: Path) -> None:
    """`pip install -e .` (dry run, resolved against the package index as a user's would be) over an image with
    torch 2.11 installs our package and its other dependencies but neither torch nor torchvision."""
    python = fake_image(tmp_path / "image")
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                          "--report", str(report), "-e", str(ROOT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    install = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "mm_moe" in install and "timm" in install, install
    assert "torch" not in install and "torchvision" not in install, \
        f"pip would replace the image's torch: {install.get('torch')} / {install.get('torchvision')}"
