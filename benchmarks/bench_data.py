"""Pretraining pipeline throughput (decode + transform + tokenise/MLM mask + block mask): samples/s with 0, 1, 2
DataLoader workers, measured in one run over the same shards (written first, from the synthetic world).

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


def measure(urls: list[str], model: BEiT3Config, workers: int, batch_size: int) -> tuple[float, int]:
    tok = load_tokenizer()
    loader = pretrain_loader(urls, tok, PretrainDataConfig(), model, batch_size, num_workers=workers)
    n, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1:  # start after the first batch: worker start-up is not throughput
            start, n = time.perf_counter(), 0
        n += len(batch["keys"])
    return n / (time.perf_counter() - start), n


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
        print(f"# pretraining pipeline, {args.img_size}px PNG, {len(urls)} shards, batch {args.batch_size}")
        print("| workers | samples/s | vs 0 workers |\n|---|---|---|")
        base = None
        for w in args.workers:
            rate, _ = measure(urls, cfg, w, args.batch_size)
            base = base or rate
            print(f"| {w} | {rate:.0f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
