"""The MoE layer benchmark runs end to end at a small size: every layer and peer gets a row with a ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--d", "64", "--tokens", "256", "--experts", "4", "--dense-hidden", "256", "--topk", "2", "--rounds", "1"]


def bench_moe(*args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_moe.py"), *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_bench_moe_prints_a_ratio_for_every_layer_and_peer():
    out = bench_moe("--routing", "balanced", "skewed")
    assert "freed memory kept" in out.splitlines()[0]
    layers = ["smoe", "smoe-swiglu", "xmoe", "mhmoe h=2", "mhmoe h=4", "cartesian", "HF Mixtral grouped_mm",
              "torchscale X-MoE"]
    for routing in ("balanced", "skewed"):
        for layer in layers:
            row = re.search(rf"^\| {re.escape(layer)} \| 2 \| {routing} \|.*\| (\d+\.\d+)x \|", out, re.M)
            assert row and float(row.group(1)) > 0, f"{layer} {routing}:\n{out}"


def test_bench_moe_matmul_mode_and_glibc_default():
    out = bench_moe("--matmul", "--glibc-default")
    assert "glibc default" in out.splitlines()[0]
    rows = re.findall(r"^\| (smoe|mhmoe h=4|cartesian) \| 2 \| (\d+) x (\d+) x (\d+) \|", out, re.M)
    assert [(name, int(m) * 4) for name, m, _, _ in rows] == [("smoe", 512), ("mhmoe h=4", 2048), ("cartesian", 512)]
