"""Evaluation: the official VQA accuracy and NLVR2 metrics, COCO caption scoring, and the evaluation loop of each
task."""

from mm_moe.eval.captioning import score_captions
from mm_moe.eval.loops import caption_predictions, nlvr2_predictions, rank_and_world, shard_indices, vqa_predictions
from mm_moe.eval.nlvr2 import nlvr2_metrics, read_predictions, text_only_predictions, write_predictions
from mm_moe.eval.vqa_metric import evaluate as evaluate_vqa
from mm_moe.eval.vqa_metric import vqa_accuracy
from mm_moe.formats.vqa import normalize_answer

__all__ = [
    "evaluate_vqa", "vqa_accuracy", "normalize_answer", "nlvr2_metrics", "text_only_predictions", "write_predictions",
    "read_predictions",
    "score_captions",
    "vqa_predictions", "nlvr2_predictions", "caption_predictions", "rank_and_world", "shard_indices",
]
