"""COCO captioning evaluation: caption the images of a Karpathy split with a fine-tuned run and/or score a results
file with pycocoevalcap's scorers (PTB tokenisation; BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE with --spice).

    python eval_caption.py --ckpt runs/caption_demo --karpathy coco/dataset_coco.json --images coco [--split test]
    python eval_caption.py --results captions.json --karpathy coco/dataset_coco.json [--split test]

The results file is the [{"image_id", "caption"}] list the COCO and nocaps servers accept. As the official
COCOEvalCap, scoring covers the images of the results file; the split's count is printed beside it.
Under torchrun (`torchrun --nproc_per_node N eval_caption.py --ckpt ...`) every process predicts its slice of the
split and the first writes and scores them all: the same file and scores as one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; usage errors exit here, before torch is imported."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a fine-tuned captioning checkpoint or run directory (or its best/)")
    src.add_argument("--results", type=Path, help="an existing results file to score")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="check the checkpoint's file sizes only, not their sha256 sums (for huge files)")
    p.add_argument("--karpathy", type=Path, required=True, help="Karpathy dataset_coco.json (the ground truth)")
    p.add_argument("--split", default="test", help="Karpathy split (default: test)")
    p.add_argument("--images", type=Path, help="COCO image folder (with --ckpt)")
    p.add_argument("--out", type=Path, help="results file to write (default: next to the checkpoint)")
    p.add_argument("--beam", type=int, default=3, help="beam size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--spice", action="store_true", help="also SPICE (needs Java and Stanford CoreNLP)")
    args = p.parse_args(argv)
    if args.ckpt and args.images is None:
        p.error("--ckpt needs --images")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mm_moe.errors import run_reporting

    def report() -> None:
        scores = run(args)
        if scores is not None:  # None: a rank other than the first under torchrun
            print(json.dumps(scores, indent=2))

    return run_reporting("eval_caption.py", report)


def run(args: argparse.Namespace) -> dict | None:
    """Caption (--ckpt) and score: {"images_scored", "images_in_split", BLEU-1..4, METEOR, ROUGE-L, CIDEr}; None on
    the ranks other than the first under torchrun (each captions its slice, the first scores them all)."""
    import tempfile

    from mm_moe.data import read_karpathy, write_coco_gt
    from mm_moe.eval import score_captions

    images = read_karpathy(args.karpathy, (args.split,))
    if args.ckpt:
        from mm_moe.data import CaptionDataset
        from mm_moe.engine import distributed_session, resolve_checkpoint
        from mm_moe.eval import caption_predictions
        from mm_moe.inference import Captioner
        from mm_moe.model import BeamConfig

        with distributed_session() as info:  # under torchrun each rank captions its slice of the images
            p = Captioner.from_pretrained(args.ckpt, info.device, verify=args.verify)
            cfg = p.cfg
            ds = CaptionDataset(args.karpathy, args.images, p.tokenizer, p.transform, splits=(args.split,),
                                per_image=True, max_text_len=cfg.model.max_text_len)
            beam = BeamConfig(beam_size=args.beam, max_len=cfg.model.max_text_len - 2)
            results = caption_predictions(p.model, ds, p.tokenizer, beam, args.batch_size, p.device)
        if not info.is_main:
            return None
        out = args.out or resolve_checkpoint(args.ckpt, args.verify) / f"caption_results_{args.split}.json"
        out.write_text(json.dumps(results))
        print(f"wrote {len(results)} captions to {out}")
    else:
        from mm_moe.data.common import read_json
        from mm_moe.errors import InputError

        results = read_json(args.results)
        if not isinstance(results, list):
            raise InputError(f"{args.results}: expected a list of {{'image_id', 'caption'}} objects, "
                             f"got a {type(results).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        scores = score_captions(write_coco_gt(args.karpathy, args.split, Path(tmp) / "gt.json"), results, args.spice)
    return {"images_scored": len(results), "images_in_split": len(images), **scores}


if __name__ == "__main__":
    sys.exit(main())
