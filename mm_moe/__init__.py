"""mm-moe: a BEiT-3-style multimodal encoder whose FFNs can be Mixture-of-Experts layers.

The names below are imported on first use, so `import mm_moe.config` (what a CLI needs to check its
arguments) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "mm_moe.config": ["RunConfig", "BEiT3Config", "FFNConfig"],
    "mm_moe.config_files": ["load_config"],
    "mm_moe.errors": ["ConfigError", "InputError"],
    "mm_moe.moe": ["build_ffn"],
    "mm_moe.model": ["BEiT3", "BEiT3ForPretraining", "BEiT3ForVQA", "BEiT3ForNLVR2", "BEiT3ForCaptioning"],
    "mm_moe.data": ["load_tokenizer"],
    "mm_moe.engine": ["Trainer", "build_task"],
    "mm_moe.inference": ["load_pretraining_model", "VQAPredictor", "Captioner", "NLVR2Predictor"],
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mm_moe' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
