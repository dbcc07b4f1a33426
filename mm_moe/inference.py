"""Task models loaded from our checkpoints, ready for inference (eval mode, on CPU).

    model, cfg = load_pretraining_model("runs/pretrain_demo")
    model, vocab, cfg = load_vqa_model("runs/vqa_demo")
"""

from __future__ import annotations

import sys
from pathlib import Path

from mm_moe.config import RunConfig
from mm_moe.data.vqa import AnswerVocab
from mm_moe.engine.checkpoint import load_run_config, load_weights, resolve_checkpoint
from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForPretraining, BEiT3ForVQA


def load_pretraining_model(ckpt: str | Path) -> tuple[BEiT3ForPretraining, RunConfig]:
    """The encoder of any task checkpoint inside a BEiT3ForPretraining (MLM / MIM heads random if it had none)."""
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_run_config(ckpt)
    model = BEiT3ForPretraining(cfg.model)
    missing, _ = load_weights(model, ckpt, strict=False)
    if any(k.startswith("beit3.") for k in missing):
        raise KeyError(f"{ckpt}: missing encoder weights {[k for k in missing if k.startswith('beit3.')][:5]}")
    if missing:
        print(f"note: {ckpt} is not a pretraining checkpoint (no MLM head): routing statistics are meaningful, "
              "the masked-LM losses of the robustness experiment are not", file=sys.stderr)
    return model.eval(), cfg


def load_vqa_model(ckpt: str | Path) -> tuple[BEiT3ForVQA, AnswerVocab, RunConfig]:
    """A fine-tuned VQA model with its answer vocabulary (answers.json of the run or checkpoint)."""
    path = resolve_checkpoint(ckpt)
    cfg = load_run_config(path)
    vocab_file = next((p / "answers.json" for p in (path, path.parent) if (p / "answers.json").is_file()), None)
    if vocab_file is None:
        raise FileNotFoundError(f"{path}: no answers.json in the checkpoint or its run directory")
    vocab = AnswerVocab.load(vocab_file)
    model = BEiT3ForVQA(cfg.model, len(vocab))
    load_weights(model, path)
    return model.eval(), vocab, cfg


def _load_task_model(cls: type, ckpt: str | Path) -> tuple:
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_run_config(ckpt)
    model = cls(cfg.model)
    load_weights(model, ckpt)
    return model.eval(), cfg


def load_captioning_model(ckpt: str | Path) -> tuple[BEiT3ForCaptioning, RunConfig]:
    """A fine-tuned captioning model."""
    return _load_task_model(BEiT3ForCaptioning, ckpt)


def load_nlvr2_model(ckpt: str | Path) -> tuple[BEiT3ForNLVR2, RunConfig]:
    """A fine-tuned NLVR2 model."""
    return _load_task_model(BEiT3ForNLVR2, ckpt)


__all__ = ["load_pretraining_model", "load_vqa_model", "load_captioning_model", "load_nlvr2_model"]
