"""NLVR2 evaluation: predict with a fine-tuned run and/or score an official predictions CSV, as lil-lab/nlvr
`nlvr2/eval/metrics.py` does (accuracy; consistency over identifiers with the third part blanked).

    python eval_nlvr2.py --ckpt runs/nlvr2_demo --data nlvr2/dev.json --images nlvr2/images [--out preds.csv]
    python eval_nlvr2.py --results preds.csv --data nlvr2/test1.json

Predictions are written as the official CSV (`identifier,True|False` per line) and scored against the labels
of --data (dev, test-P).
Under torchrun (`torchrun --nproc_per_node N eval_nlvr2.py --ckpt ...`) every process predicts its slice of the
split and the first writes and scores them all: the same file and scores as one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a fine-tuned NLVR2 checkpoint or run directory")
    src.add_argument("--results", type=Path, help="an existing predictions CSV to score")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="check the checkpoint's file sizes only, not their sha256 sums (for huge files)")
    p.add_argument("--data", type=Path, required=True, help="NLVR2 JSON Lines (dev.json, test1.json)")
    p.add_argument("--images", type=Path, help="image folder (with --ckpt)")
    p.add_argument("--out", type=Path, help="predictions CSV to write (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.ckpt and args.images is None:
        p.error("--ckpt needs --images")
    from mm_moe.errors import run_reporting

    return run_reporting("eval_nlvr2.py", lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Predict (--ckpt) and score."""
    from mm_moe.data.nlvr2 import read_nlvr2
    from mm_moe.eval import nlvr2_metrics, read_predictions, write_predictions

    rows = read_nlvr2(args.data)
    if args.ckpt:
        from mm_moe.data import NLVR2Dataset
        from mm_moe.engine import distributed_session, resolve_checkpoint
        from mm_moe.eval import nlvr2_predictions
        from mm_moe.inference import NLVR2Predictor

        with distributed_session() as info:  # under torchrun each rank judges its slice of the statements
            p = NLVR2Predictor.from_pretrained(args.ckpt, info.device, verify=args.verify)
            ds = NLVR2Dataset(args.data, args.images, p.tokenizer, p.transform, p.cfg.model.max_text_len)
            predictions = nlvr2_predictions(p.model, ds, args.batch_size, p.device)
        if not info.is_main:
            return
        out = args.out or resolve_checkpoint(args.ckpt, args.verify) / f"nlvr2_predictions_{args.data.stem}.csv"
        write_predictions(out, predictions)
        print(f"wrote {len(predictions)} predictions to {out}")
    else:
        predictions = read_predictions(args.results)
    print(json.dumps(nlvr2_metrics(rows, predictions), indent=2))


if __name__ == "__main__":
    sys.exit(main())
