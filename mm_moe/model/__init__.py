"""The BEiT-3-style Multiway encoder, its task heads, caption generation, torchscale conversion and sparse
upcycling."""

from mm_moe.config import BEiT3Config
from mm_moe.model.beit3 import BEiT3, caption_mask, convert_torchscale_state_dict, upcycle
from mm_moe.model.encoder import Block, Encoder, EncoderOutput, KVCache, LayerScale
from mm_moe.model.generation import BeamConfig, CaptionDecoder
from mm_moe.model.heads import (
    BEiT3ForCaptioning,
    BEiT3ForNLVR2,
    BEiT3ForPretraining,
    BEiT3ForVQA,
    TaskModel,
    TaskOutput,
    VisualTokenizer,
)

__all__ = [
    "BEiT3", "BEiT3Config", "caption_mask", "convert_torchscale_state_dict", "upcycle",
    "Block", "Encoder", "EncoderOutput", "KVCache", "LayerScale", "BeamConfig", "CaptionDecoder",
    "TaskModel", "TaskOutput", "BEiT3ForCaptioning", "BEiT3ForNLVR2", "BEiT3ForPretraining", "BEiT3ForVQA",
    "VisualTokenizer",
]
