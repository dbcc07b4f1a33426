"""The repository's command-line scripts as modules, for tests that run them in-process as users run them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script(path: str):
    """A script of the repository (e.g. "data/make_shards.py") as a module; its main(argv) is what the command runs."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
