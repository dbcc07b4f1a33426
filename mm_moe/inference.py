"""Inference in a few lines: fine-tuned models with their tokenizer, image transform and answer vocabulary.

    from mm_moe.inference import VQAPredictor, Captioner, NLVR2Predictor
    vqa = VQAPredictor.from_pretrained("runs/vqa_demo")          # a run (its latest step), a step-*/ or best/ folder
    vqa.answer("photo.jpg", "what color is the circle?")         # [("red", 0.97), ("blue", 0.02), ...]
    Captioner.from_pretrained("runs/caption_demo").caption(["a.jpg", "b.jpg"], beam=3)
    NLVR2Predictor.from_pretrained("runs/nlvr2_demo").predict("left.png", "right.png", "there are two circles")
    vqa.save_pretrained("export/vqa")                             # self-contained: weights, config, tokenizer, answers

On the command line: `mm-moe-predict vqa RUN --image photo.jpg --question "what color is the circle?"`
(also `caption RUN --image ...` and `nlvr2 RUN --left ... --right ... --sentence ...`).

A folder these read holds model.safetensors and config.yaml (the run config), and, in it or its parent run
directory, tokenizer/ (else model.tokenizer of the config is loaded) and answers.json (VQA); `save_pretrained`
writes all of them into one folder, which --init and the eval commands accept too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from PIL import Image
from safetensors.torch import save_model
from torch import Tensor, nn

from mm_moe.config import RunConfig
from mm_moe.config_files import to_dict
from mm_moe.data.common import load_image, pad, to_rgb
from mm_moe.data.tokenizer import check_tokenizer, load_tokenizer
from mm_moe.data.transforms import eval_transform
from mm_moe.data.vqa import AnswerVocab
from mm_moe.engine.checkpoint import load_run_config, load_weights, resolve_checkpoint, write_manifest
from mm_moe.errors import InputError, run_reporting
from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForPretraining, BEiT3ForVQA
from mm_moe.model.generation import BeamConfig, CaptionDecoder

ImageLike = str | Path | Image.Image | Tensor
"""A file path, a PIL image, or an image tensor [3, H, W] already transformed (normalised, model size)."""


def load_pretraining_model(ckpt: str | Path, verify: bool = True) -> tuple[BEiT3ForPretraining, RunConfig]:
    """The encoder of any task checkpoint inside a BEiT3ForPretraining (MLM / MIM heads random if it had none);
    the checkpoint is checked against its manifest (`resolve_checkpoint`)."""
    ckpt = resolve_checkpoint(ckpt, verify)
    cfg = load_run_config(ckpt, verify)
    model = BEiT3ForPretraining(cfg.model)
    missing, _ = load_weights(model, ckpt, strict=False, verify=verify)
    if any(k.startswith("beit3.") for k in missing):
        raise KeyError(f"{ckpt}: missing encoder weights {[k for k in missing if k.startswith('beit3.')][:5]}")
    if missing:
        print(f"note: {ckpt} is not a pretraining checkpoint (no MLM head): routing statistics are meaningful, "
              "the masked-LM losses of the robustness experiment are not", file=sys.stderr)
    return model.eval(), cfg


def _beside(folder: Path, name: str) -> Path | None:
    """`name` in a checkpoint folder or in its run directory."""
    return next((p / name for p in (folder, folder.parent) if (p / name).exists()), None)


class Predictor:
    """A fine-tuned task model ready for inference (eval mode, no gradients); subclasses name the task."""

    task: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig, answers: list[str] | None = None,
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer, self.cfg, self.answers = model.eval().to(self.device), tokenizer, cfg, answers
        self.transform = eval_transform(cfg.model.img_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, verify: bool = True) -> Predictor:
        """Load from a run directory (its latest checkpoint), a checkpoint folder or a `save_pretrained` folder,
        checked against its manifest (sha256 sums; `verify=False` checks file sizes only)."""
        folder = resolve_checkpoint(path, verify)
        cfg = load_run_config(folder, verify)
        if cfg.task != cls.task:
            raise InputError(f"{path}: a {cfg.task!r} model, not {cls.task!r} (use the predictor of its task)")
        tok_dir = _beside(folder, "tokenizer")
        tokenizer = load_tokenizer(tok_dir if tok_dir is not None else cfg.model.tokenizer)
        check_tokenizer(tokenizer, cfg.model.vocab_size, f"{tok_dir or cfg.model.tokenizer}")
        answers = None
        if cls.task == "vqa":
            vocab_file = _beside(folder, "answers.json")
            if vocab_file is None:
                raise InputError(f"{path}: no answers.json in the checkpoint or its run directory")
            answers = AnswerVocab.load(vocab_file).answers
        model = cls.model_class(cfg.model, *([] if answers is None else [len(answers)]))
        load_weights(model, folder, verify=verify)
        return cls(model, tokenizer, cfg, answers, device)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write model.safetensors, config.yaml, tokenizer/ (and answers.json) into `folder`, atomically."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if self.answers is not None:
            AnswerVocab(self.answers).save(tmp / "answers.json")
        write_manifest(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    # --- inputs ----------------------------------------------------------------------------------------------
    def images(self, images: Sequence[ImageLike]) -> Tensor:
        """[B, 3, S, S] on the model's device: files and PIL images through the evaluation transform."""
        out = []
        for img in images:
            if isinstance(img, str | Path):
                img = load_image(img)  # 16-bit scaled; unreadable, truncated, oversized: InputError
            elif isinstance(img, Image.Image):
                img = to_rgb(img)
            elif not isinstance(img, Tensor):
                raise InputError(f"expected an image file, a PIL image or a tensor, got {type(img).__name__}")
            out.append(img if isinstance(img, Tensor) else self.transform(img))
        return torch.stack(out).to(self.device)

    def text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids Long[B, L] and padding Bool[B, L] (True: pad) on the model's device."""
        for t in texts:
            if not isinstance(t, str):
                raise InputError(f"expected text, got {t!r:.60} ({type(t).__name__})")
        ids = pad([self.tokenizer(t, truncation=True, max_length=self.cfg.model.max_text_len)["input_ids"]
                   for t in texts], self.tokenizer.pad_token_id)
        return ids.to(self.device), (ids == self.tokenizer.pad_token_id).to(self.device)


def _batch(*args: Any) -> tuple[bool, list[list[Any]]]:
    """(whether the call was batched, the arguments as equal-length lists)."""
    batched = isinstance(args[-1], list | tuple)
    lists = [list(a) if batched else [a] for a in args]
    if len({len(a) for a in lists}) != 1:
        raise InputError(f"batched inputs must have equal lengths, got {[len(a) for a in lists]}")
    return batched, lists


class VQAPredictor(Predictor):
    """Answers questions about images with a fine-tuned VQA model."""

    task = "vqa"
    model_class = BEiT3ForVQA

    @torch.no_grad()
    def answer(self, image: ImageLike | Sequence[ImageLike], question: str | Sequence[str],
               top_k: int = 5) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """The top_k answers with their scores (sigmoid of the logits: the model is trained with BCE on soft
        scores), best first; lists of images and questions give one list per pair."""
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k: expected an integer >= 1, got {top_k!r}")
        batched, (imgs, questions) = _batch(image, question)
        ids, padding = self.text(questions)
        scores = self.model(self.images(imgs), ids, padding).logits.float().sigmoid()
        top = scores.topk(min(top_k, scores.shape[1]), dim=1)
        out = [[(self.answers[i], round(s, 6)) for s, i in zip(vs, ix, strict=True)]
               for vs, ix in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        return out if batched else out[0]


class Captioner(Predictor):
    """Captions images with a fine-tuned captioning model (beam search, image encoded once)."""

    task = "caption"
    model_class = BEiT3ForCaptioning

    @torch.no_grad()
    def caption(self, images: ImageLike | Sequence[ImageLike], beam: int = 3, max_len: int | None = None) -> str | list[str]:
        """The caption of each image; beam 1 is greedy; max_len (tokens, end included) defaults to the model's
        text length minus the start token and the [MASK] that predicts each next token."""
        batched = isinstance(images, list | tuple)
        limit = self.cfg.model.max_text_len - 2
        cfg = BeamConfig(beam_size=beam, max_len=min(max_len or limit, limit))
        captions = CaptionDecoder(self.model, self.tokenizer, cfg).captions(self.images(images if batched else [images]))
        return captions if batched else captions[0]


class NLVR2Predictor(Predictor):
    """Judges whether a sentence is true of a pair of images with a fine-tuned NLVR2 model."""

    task = "nlvr2"
    model_class = BEiT3ForNLVR2

    @torch.no_grad()
    def predict(self, left: ImageLike | Sequence[ImageLike], right: ImageLike | Sequence[ImageLike],
                sentence: str | Sequence[str]) -> tuple[bool, float] | list[tuple[bool, float]]:
        """(the prediction, the probability that the sentence is true) per (left, right, sentence)."""
        batched, (lefts, rights, sentences) = _batch(left, right, sentence)
        ids, padding = self.text(sentences)
        p_true = self.model(self.images(lefts), self.images(rights), ids, padding).logits.float().softmax(-1)[:, 1]
        out = [(p > 0.5, round(p, 6)) for p in p_true.tolist()]
        return out if batched else out[0]


def _positive(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    """`mm-moe-predict`: answer, caption or judge from the command line (one JSON line per input)."""
    p = argparse.ArgumentParser(prog="mm-moe-predict", description=main.__doc__)
    sub = p.add_subparsers(dest="task", required=True)
    vqa = sub.add_parser("vqa", help="answer a question about an image")
    vqa.add_argument("--image", required=True)
    vqa.add_argument("--question", required=True, action="append", help="repeat for several questions")
    vqa.add_argument("--top-k", type=_positive, default=5)
    cap = sub.add_parser("caption", help="caption images")
    cap.add_argument("--image", required=True, nargs="+")
    cap.add_argument("--beam", type=int, default=3)
    nl = sub.add_parser("nlvr2", help="is the sentence true of the image pair?")
    nl.add_argument("--left", required=True)
    nl.add_argument("--right", required=True)
    nl.add_argument("--sentence", required=True)
    for sp in (vqa, cap, nl):
        sp.add_argument("run", help="run directory, checkpoint folder or save_pretrained folder")
        sp.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
        sp.add_argument("--no-verify", dest="verify", action="store_false",
                        help="check the checkpoint's file sizes only, not their sha256 sums (for huge files)")
    args = p.parse_args(argv)

    def work() -> None:
        if args.task == "vqa":
            predictor = VQAPredictor.from_pretrained(args.run, args.device, args.verify)
            for q, answers in zip(args.question, predictor.answer([args.image] * len(args.question), args.question,
                                                                  args.top_k), strict=True):
                print(json.dumps({"question": q, "answers": answers}))
        elif args.task == "caption":
            captions = Captioner.from_pretrained(args.run, args.device, args.verify).caption(args.image, beam=args.beam)
            for image, caption in zip(args.image, captions, strict=True):
                print(json.dumps({"image": image, "caption": caption}))
        else:
            truth, p_true = NLVR2Predictor.from_pretrained(args.run, args.device, args.verify).predict(
                args.left, args.right, args.sentence)
            print(json.dumps({"sentence": args.sentence, "true": truth, "p_true": p_true}))

    return run_reporting("mm-moe-predict", work)


__all__ = ["load_pretraining_model", "Predictor", "VQAPredictor", "Captioner", "NLVR2Predictor", "main"]
