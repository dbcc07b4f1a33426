"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """The synthetic world of `tiny.tiny_world`, made once per session; tests that damage files copy them first."""
    return tiny_world(tmp_path_factory.mktemp("world"))
