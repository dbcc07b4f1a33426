"""Learning curves of VQA fine-tuning by question kind: which skill the model has learnt, and when.

    python benchmarks/easyvqa_curves.py                                          # the easy-VQA recipe
    python benchmarks/easyvqa_curves.py --init runs/demo/pretrain train.steps=3000
    python benchmarks/easyvqa_curves.py --variant dense                          # a matched FFN variant instead
    python benchmarks/easyvqa_curves.py --results runs/vqa_easyvqa/vqa_val_results.json   # score a run's answers

Trains as `train_mm.py finetune vqa` does (the seed, build_task, `--init`, then the Trainer's own steps) from a
config (default configs/finetune_vqa_easyvqa.yaml) plus `key=value` overrides, and every `--every` steps prints the
accuracy (exact match: easy-VQA's ten answers are one answer repeated) on a fixed sample of validation questions by
kind: open questions whose answer is a colour or a shape, and yes/no questions that name a colour or a shape; plus
the open-shape accuracy on as many training questions, to tell under-fitting from over-fitting. Not a benchmark of
speed: no checkpoints, no resume. `--results` scores a finished run's answers on the whole validation split
instead, splitting each yes/no kind by whether the colour or shape it names is the image's (`+`) or not (`-`):
a model that has not learnt to match the word with the image answers the `-` questions by their prior and
misses the `+` ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import VARIANTS
from compare_variants import base_model, model_overrides

from mm_moe.config import RunConfig
from mm_moe.config_files import load_config
from mm_moe.data import VQADataset, eval_transform, load_tokenizer
from mm_moe.engine import Trainer, build_task
from mm_moe.engine.init_weights import init_encoder
from mm_moe.moe import matched_variants

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


def kind(question: str, answer: str) -> str:
    """open_color / open_shape by the answer; yn_color / yn_shape by whether the question names a colour."""
    if answer in ("yes", "no"):
        return "yn_color" if COLOURS & set(question.rstrip("?").split()) else "yn_shape"
    return "open_color" if answer in COLOURS else "open_shape"


def named_is_present(question: str, answer: str) -> bool:
    """Whether the colour or shape a yes/no question names is the image's: 'yes' unless the question says 'not'."""
    return (answer == "yes") != ("not" in question.rstrip("?").split())


def score_results(results: str, questions: str, annotations: str) -> dict[str, float]:
    """Exact-match accuracy (official here: easy-VQA's ten answers are one answer repeated) of a VQA results file
    by kind, yes/no kinds split into named-present (+) and named-absent (-)."""
    predicted = {r["question_id"]: r["answer"] for r in json.loads(Path(results).read_text())}
    answers = {a["question_id"]: a["multiple_choice_answer"]
               for a in json.loads(Path(annotations).read_text())["annotations"]}
    hits: dict[str, list[bool]] = defaultdict(list)
    for q in json.loads(Path(questions).read_text())["questions"]:
        qid, answer = q["question_id"], answers[q["question_id"]]
        if qid not in predicted:
            raise KeyError(f"{results}: no answer for question {qid}")
        k = kind(q["question"], answer)
        if answer in ("yes", "no"):
            k += "+" if named_is_present(q["question"], answer) else "-"
        hits[k].append(predicted[qid] == answer)
    every = [h for v in hits.values() for h in v]
    return {"all": round(100 * sum(every) / len(every), 2),
            **{k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}}


class Probe:
    """A fixed random sample of one split's questions, scored by kind."""

    def __init__(self, questions: str, annotations: str, images: str, tokenizer, img_size: int, max_len: int,
                 n: int) -> None:
        self.ds = VQADataset(questions, images, tokenizer, eval_transform(img_size), max_text_len=max_len)
        answers = {a["question_id"]: a["multiple_choice_answer"]
                   for a in json.loads(Path(annotations).read_text())["annotations"]}
        self.idx = random.Random(0).sample(range(len(self.ds)), min(n, len(self.ds)))
        self.truth = {q["question_id"]: (answers[q["question_id"]], kind(q["question"], answers[q["question_id"]]))
                      for q in self.ds.questions}

    @torch.no_grad()
    def score(self, model: torch.nn.Module, answers: list[str]) -> dict[str, float]:
        model.eval()
        hits: dict[str, list[bool]] = defaultdict(list)
        for i in range(0, len(self.idx), 100):
            b = self.ds.collate([self.ds[j] for j in self.idx[i:i + 100]])
            pred = model(b["images"], b["text_ids"], b["text_padding"]).logits.argmax(1).tolist()
            for qid, p in zip(b["question_ids"], pred, strict=True):
                answer, k = self.truth[qid]
                hits[k].append(answers[p] == answer)
        model.train()
        every = [h for v in hits.values() for h in v]
        return {"all": round(100 * sum(every) / len(every), 1),
                **{k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "finetune_vqa_easyvqa.yaml"))
    p.add_argument("--init", help="checkpoint whose encoder to start from (as train_mm.py --init)")
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--sample", type=int, default=1500, help="questions scored per split")
    p.add_argument("--variant", choices=VARIANTS,
                   help="the tiny model with this matched FFN variant (as compare_variants.py), not the config's model")
    p.add_argument("--results", help="score this VQA results file (a run's vqa_val_results.json) and exit")
    p.add_argument("overrides", nargs="*", help="config key=value")
    args = p.parse_args(argv)
    if args.results:
        d = load_config(RunConfig, args.config, ["task=vqa", *args.overrides]).data
        print(json.dumps(score_results(args.results, d.vqa_val_questions, d.vqa_val_annotations)))
        return
    if args.variant:
        base = base_model()
        moe = matched_variants(base.d_model, base.ffn.hidden, subln=True)[args.variant]
        args.overrides = [*model_overrides(moe), *args.overrides]
    with tempfile.TemporaryDirectory() as run_dir:  # the trainer's config, metrics; no checkpoints are written
        cfg = load_config(RunConfig, args.config, ["task=vqa", *args.overrides, f"run_dir={run_dir}"])
        torch.manual_seed(cfg.train.seed)  # as train_mm.py: before the model is built
        tok = load_tokenizer(cfg.model.tokenizer)
        task = build_task(cfg, tok)
        if args.init:
            init_encoder(task.model, args.init)
        trainer = Trainer(task, cfg)
        d, m = cfg.data, cfg.model
        probes = {split: Probe(questions, annotations, d.vqa_images, tok, m.img_size, m.max_text_len, args.sample)
                  for split, questions, annotations in (("val", d.vqa_val_questions, d.vqa_val_annotations),
                                                        ("train", d.vqa_train_questions, d.vqa_train_annotations))}
        answers = task.answers
        batches, t0 = trainer._batches(), time.perf_counter()
        trainer.model.train()
        while trainer.step < cfg.train.steps:
            sums, _ = trainer.train_step(batches)
            if trainer.step % args.every == 0 or trainer.step == cfg.train.steps:
                print(json.dumps({"step": trainer.step, "seconds": round(time.perf_counter() - t0),
                                  "loss": round(float(sums["loss"]), 3), "val": probes["val"].score(task.model, answers),
                                  "train_open_shape": probes["train"].score(task.model, answers).get("open_shape")}),
                      flush=True)


if __name__ == "__main__":
    main()
