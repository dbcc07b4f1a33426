"""Processes a test launched, seen from /proc (Linux): their children, command lines and whether they still run."""

from __future__ import annotations

import subprocess
from pathlib import Path


def children(pid: int) -> list[int]:
    """The pids of process `pid`'s children (torchrun's workers under its agent, a pool's workers under a script)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def cmdline(pid: int) -> bytes:
    """Process `pid`'s command line (empty once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
