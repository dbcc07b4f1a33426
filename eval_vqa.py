"""VQA v2 evaluation: predict with a fine-tuned checkpoint and/or score a results file with the official metric.

    python eval_vqa.py --ckpt runs/vqa_demo --questions Q.json --images DIR [--annotations A.json] [--out R.json]
    python eval_vqa.py --results R.json --questions Q.json --annotations A.json

Predictions are written in the test-dev submission format, [{"question_id", "answer"}] for every question;
with --annotations the file is scored (overall, per answer type, per question type) as the current official
vqaEval.py (2021-03-11) does, or as its 2017 revision with --legacy-2017.
Under torchrun (`torchrun --nproc_per_node N eval_vqa.py --ckpt ...`) every process predicts its slice of the
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
    src.add_argument("--ckpt", help="a fine-tuned VQA checkpoint or run directory")
    src.add_argument("--results", type=Path, help="an existing results file to score")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="check the checkpoint's file sizes only, not their sha256 sums (for huge files)")
    p.add_argument("--questions", type=Path, required=True)
    p.add_argument("--annotations", type=Path)
    p.add_argument("--images", type=Path, help="image folder (with --ckpt)")
    p.add_argument("--out", type=Path, help="results file to write (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--legacy-2017", action="store_true",
                   help="score as the 2017 revision of vqaEval.py (before 'Fixed processing answers bug')")
    args = p.parse_args(argv)
    if args.ckpt and args.images is None:
        p.error("--ckpt needs --images")
    if args.results and args.annotations is None:
        p.error("--results needs --annotations (there is nothing to do with a results file but score it)")
    from mm_moe.errors import run_reporting

    return run_reporting("eval_vqa.py", lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Predict (--ckpt) and/or score."""
    from mm_moe.eval import evaluate_vqa
    from mm_moe.formats.vqa import read_results

    if args.ckpt:
        from mm_moe.data import VQADataset
        from mm_moe.engine import distributed_session, resolve_checkpoint
        from mm_moe.eval import vqa_predictions
        from mm_moe.inference import VQAPredictor

        with distributed_session() as info:  # under torchrun each rank answers its slice of the questions
            p = VQAPredictor.from_pretrained(args.ckpt, info.device, verify=args.verify)
            ds = VQADataset(args.questions, args.images, p.tokenizer, p.transform, max_text_len=p.cfg.model.max_text_len)
            results = vqa_predictions(p.model, ds, p.answers, args.batch_size, p.device)
        if not info.is_main:
            return
        out = args.out or resolve_checkpoint(args.ckpt, args.verify) / f"vqa_results_{args.questions.stem}.json"
        out.write_text(json.dumps(results))
        print(f"wrote {len(results)} answers to {out}")
    else:
        results = read_results(args.results)
    if args.annotations:
        report = evaluate_vqa(results, args.annotations, args.questions, legacy=args.legacy_2017)
        report.pop("per_question")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
