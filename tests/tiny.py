"""The tiny model and world the end-to-end tests train on (shared, so every test file means the same by them)."""

from __future__ import annotations

from pathlib import Path

from mm_moe.data import write_world

TINY_MODEL = ["model.img_size=32", "model.d_model=32", "model.depth=2", "model.heads=2", "model.ffn.hidden=64",
              "model.moe.hidden=16", "model.moe.num_experts=4"]
"""train_mm.py overrides that shrink a recipe's model to a 2 x 32 encoder on 32-pixel images."""
TINY = [*TINY_MODEL, "train.batch_size=4", "train.steps=2", "train.log_every=1"]
"""TINY_MODEL, trained for 2 steps of batch 4, logged every step."""


def tiny_world(out: Path) -> Path:
    """The synthetic world the tests share: 40 training images (30 shards), 8 NLVR2 training pairs, small splits."""
    write_world(out, n_train=40, n_val=2, n_test=2, n_pairs_train=8, n_pairs_dev=3, size=32, shard_count=30)
    return out
