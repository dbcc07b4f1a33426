"""The tiny model and world the end-to-end tests train on (shared, so every test file means the same by them)."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

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


def monomodal_shards(world: Path, out: Path) -> tuple[Path, Path]:
    """Image-only and text-only shards (3 each) made from the world's pairs, their keys marked "img-" / "txt-" and
    the texts reworded, for pretraining's monomodal sources: (image folder, text folder)."""
    pairs = [s for url in sorted((world / "shards").glob("*.tar"))
             for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False)]
    images, texts = out / "images", out / "texts"
    for folder in (images, texts):
        folder.mkdir(parents=True)
    with wds.ShardWriter(str(images / "img-%03d.tar"), maxcount=len(pairs) // 3 + 1, verbose=0) as sink:
        for s in pairs:
            sink.write({"__key__": f"img-{s['__key__']}", "png": s["png"]})
    with wds.ShardWriter(str(texts / "txt-%03d.tar"), maxcount=len(pairs) // 3 + 1, verbose=0) as sink:
        for s in pairs:
            sink.write({"__key__": f"txt-{s['__key__']}", "txt": "there is " + s["txt"].decode().lower()})
    return images, texts
