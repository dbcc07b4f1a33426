"""Generate the synthetic world (images of coloured shapes) in the official VQA v2 / NLVR2 / Karpathy formats,
plus image-caption webdataset shards, and print its majority / chance baselines.

    python data/make_synthetic.py --out data/synthetic            # demo size
    python data/make_synthetic.py --out /tmp/w --train 200 --val 50 --test 50 --pairs-train 200 --pairs-dev 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mm_moe.data import write_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=2000, help="training images (5 questions, 3 captions each)")
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--pairs-train", type=int, default=2000, help="NLVR2 training statements")
    p.add_argument("--pairs-dev", type=int, default=300)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = write_world(args.out, args.train, args.val, args.test, args.pairs_train, args.pairs_dev, args.seed,
                          args.size)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
