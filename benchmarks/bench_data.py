"""Pretraining pipeline throughput (read + decode + transform + tokenise/MLM mask + block mask): samples/s with 0,
1, 2 DataLoader workers, for both readers of local shards, measured in one run over the same shards (written first,
from the synthetic world): "streamed" (webdataset: each reader its own shards, a shuffle buffer) and "by position"
(the global stream of `mm_moe.data.stream`: samples by offset, the same batches at any world size). The one-off
indexing of the shards is timed apart.

    python benchmarks/bench_data.py                     # 224px images, 3000 image-caption pairs
    python benchmarks/bench_data.py --img-size 64 --pairs 1500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mm_moe.config import BEiT3Config, PretrainDataConfig
from mm_moe.data import load_tokenizer, pretrain_loader, write_world
from mm_moe.data.stream import IndexedEpoch, RankBatches, ShardIndex


def measure(loader, warm: int = 1) -> float:
    """Samples per second of a loader, after its first `warm` batches (worker start-up is not throughput)."""
    n, start = 0, None
    for i, batch in enumerate(loader):
        if i == warm:
            start, n = time.perf_counter(), 0
        n += len(batch["keys"])
    return n / (time.perf_counter() - start)


def loaders(urls: list[str], model: BEiT3Config, workers: int, batch_size: int, index: ShardIndex) -> dict:
    """Both readers over the same shards: the streamed pipeline and the global stream (one process)."""
    tok, data = load_tokenizer(), PretrainDataConfig()
    epoch = RankBatches(index, tok, data, model, batch_size=batch_size, seed=0, epoch=0, rank=0, world=1, accum=1)
    return {"streamed": pretrain_loader(urls, tok, data, model, batch_size, num_workers=workers),
            "by position": IndexedEpoch(epoch, workers)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--pairs", type=int, default=3000, help="image-caption pairs (3 captions per image)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_world(tmp, n_train=args.pairs // 3, n_val=1, n_test=1, n_pairs_train=2, n_pairs_dev=2,
                    size=args.img_size, shard_count=max(1, args.pairs // 8))
        urls = [str(u) for u in sorted(Path(tmp, "shards").glob("*.tar"))]
        cfg = BEiT3Config(img_size=args.img_size, patch_size=16 if args.img_size >= 128 else 8)
        start = time.perf_counter()
        index = ShardIndex(urls)
        indexing = time.perf_counter() - start
        print(f"# pretraining pipeline, {args.img_size}px PNG, {len(urls)} shards, batch {args.batch_size}; indexing "
              f"the shards once: {indexing:.2f} s")
        print("| workers | streamed samples/s | by position samples/s | by position vs streamed |\n|---|---|---|---|")
        for w in args.workers:
            rates = {name: measure(loader) for name, loader in loaders(urls, cfg, w, args.batch_size, index).items()}
            print(f"| {w} | {rates['streamed']:.0f} | {rates['by position']:.0f} | "
                  f"{rates['by position'] / rates['streamed']:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
