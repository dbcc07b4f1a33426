"""Evaluation: the official VQA accuracy, captioning decode + COCO scoring, NLVR2 metrics."""
