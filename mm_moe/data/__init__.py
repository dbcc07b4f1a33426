"""Data: the tokenizer, image transforms, masking, webdataset pretraining shards and the official-format task
datasets (VQA v2, NLVR2, COCO Karpathy captions), and the synthetic world used by the demo and tests."""

from mm_moe.data.coco import CaptionDataset, read_karpathy, write_coco_gt
from mm_moe.data.common import epoch_loader, epoch_seed
from mm_moe.data.masking import BlockMasking, mask_caption, mask_text
from mm_moe.data.nlvr2 import NLVR2Dataset, read_nlvr2
from mm_moe.data.shards import first_batches, pretrain_dataset, pretrain_loader, shard_urls
from mm_moe.data.synthetic import world_files, write_world
from mm_moe.data.tokenizer import VOCAB_SIZE, check_tokenizer, load_tokenizer
from mm_moe.data.transforms import eval_transform, train_transform
from mm_moe.data.vqa import AnswerVocab, VQADataset

__all__ = [
    "load_tokenizer", "check_tokenizer", "VOCAB_SIZE", "train_transform", "eval_transform",
    "mask_text", "BlockMasking", "mask_caption",
    "shard_urls", "pretrain_dataset", "pretrain_loader", "first_batches", "epoch_loader", "epoch_seed",
    "AnswerVocab", "VQADataset", "NLVR2Dataset", "read_nlvr2", "CaptionDataset", "read_karpathy", "write_coco_gt",
    "write_world", "world_files",
]
