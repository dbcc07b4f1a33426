"""--init: a task model's encoder from one of our checkpoints (any task) or from a torchscale / unilm BEiT-3 .pth
(converted on load); position tables fitted to the model; a dense checkpoint optionally upcycled into the
config's MoE layers. The task head stays new."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from mm_moe.engine.checkpoint import CheckpointError, resolve_checkpoint, tied_duplicates
from mm_moe.model.beit3 import BEiT3, convert_torchscale_state_dict
from mm_moe.model.beit3 import upcycle as upcycle_dense
from mm_moe.placement import moe_layer_ids


def _encoder_weights(path: Path, verify: bool = True) -> dict[str, Tensor]:
    """Encoder weights (our names, no "beit3." prefix) of our checkpoint / run, or of a torchscale / unilm .pth."""
    if path.suffix in (".pth", ".pt", ".bin"):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
        return convert_torchscale_state_dict(sd.get("model", sd))  # unilm nests the weights under "model"
    file = resolve_checkpoint(path, verify) / "model.safetensors"
    try:
        weights = load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    return {k.removeprefix("beit3."): v for k, v in weights.items() if k.startswith("beit3.")}


def fit_positions(source: dict[str, Tensor], target: dict[str, Tensor]) -> list[str]:
    """Adapt a checkpoint's position tables to the model, in place: vision positions resampled to the model's patch
    grid (timm `resample_abs_pos_embed`, bicubic, no antialiasing as unilm beit3, [CLS] kept), text positions cut to
    the model's max_text_len (the first ones: identical outputs). Returns what was changed."""
    changed = []
    key = "vision.pos_embed"
    if key in source and key in target and source[key].shape != target[key].shape \
            and source[key].shape[-1] == target[key].shape[-1]:
        old, new = (math.isqrt(t.shape[1] - 1) for t in (source[key], target[key]))
        if old * old + 1 == source[key].shape[1] and new * new + 1 == target[key].shape[1]:
            source[key] = resample_abs_pos_embed(source[key], [new, new], [old, old], num_prefix_tokens=1,
                                                 interpolation="bicubic", antialias=False)
            changed.append(f"{key}: {old}x{old} -> {new}x{new} patches (resampled)")
    key = "text.pos_embed"
    if key in source and key in target and source[key].shape[1] > target[key].shape[1] \
            and source[key].shape[-1] == target[key].shape[-1]:
        changed.append(f"{key}: first {target[key].shape[1]} of {source[key].shape[1]} positions")
        source[key] = source[key][:, : target[key].shape[1]]
    return changed


def _fit(source: dict[str, Tensor], module: nn.Module, path: Path, partial: bool) -> dict[str, list[str]]:
    """Load `source` into `module` after the fit check; the report of `init_encoder`."""
    target = module.state_dict()
    adapted = fit_positions(source, target)
    tied = tied_duplicates(module)
    report = {
        "missing": sorted(k for k in target if k not in source and k not in tied),
        "unexpected": sorted(k for k in source if k not in target),
        "mismatched": sorted(f"{k} {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
                             for k in source if k in target and source[k].shape != target[k].shape),
    }
    if any(report.values()) and not partial:
        lines = [f"{len(v)} {kind}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for kind, v in report.items() if v]
        raise CheckpointError(f"{path}: does not fit the model's encoder ({'; '.join(lines)}); check the model "
                              "config, or pass --init-partial to load only the matching weights")
    loadable = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    module.load_state_dict(loadable, strict=False)
    return {"loaded": sorted(loadable), "adapted": adapted, **report}


def init_encoder(model: nn.Module, path: str | Path, partial: bool = False, upcycle: bool = False,
                 verify: bool = True) -> dict[str, list[str]]:
    """Initialise `model.beit3` (any task model's encoder) from a checkpoint; the task head stays new.

    Every encoder weight must be present with the same shape (after `fit_positions`); otherwise the error lists the
    missing, unexpected and mismatched keys. With `partial`, the matching weights are loaded and the rest reported.
    With `upcycle`, the checkpoint is a dense model: it is loaded into the dense twin of the model's config, whose
    FFNs then become the configured MoE layers (`mm_moe.model.upcycle`). One of our checkpoints is checked against
    its manifest first (`resolve_checkpoint`; `verify=False` checks sizes only).
    Returns {"loaded", "adapted", "missing", "unexpected", "mismatched"} (+ the upcycle origins with `upcycle`)."""
    path = Path(path)
    source = _encoder_weights(path, verify)
    if not upcycle:
        return _fit(source, model.beit3, path, partial)
    cfg = model.beit3.cfg
    if cfg.moe is None or not moe_layer_ids(cfg.depth, cfg.moe_layers):
        raise CheckpointError(f"--upcycle {path}: the model config has no MoE layers to upcycle into "
                              "(set model.moe and model.moe_layers)")
    dense = BEiT3(dataclasses.replace(cfg, moe=None, moe_layers="none"))
    report = _fit(source, dense, path, partial)
    try:
        sparse, origins = upcycle_dense(dense, cfg.moe, cfg.moe_layers, cfg.moe_shared_branches)
    except ValueError as err:
        raise CheckpointError(f"--upcycle {path}: {err}") from err
    model.beit3.load_state_dict(sparse.state_dict())
    return {**report, **{f"upcycle_{k}": v for k, v in origins.items()}}


__all__ = ["init_encoder", "fit_positions"]
