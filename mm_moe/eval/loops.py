"""Evaluation loops per task: a model and an (official-format) dataset in, predictions in the official
submission formats out. Used after fine-tuning (train_mm.py), by eval_vqa.py and by the demo.

The loops take datasets and answer lists as arguments (nothing from `mm_moe.data` is imported here), so the
data layer can use the official metrics of this package without an import circle.

Under torch.distributed every rank must call a loop: each predicts its contiguous slice of the split (padded to
the same number of items, so that FSDP2's and expert parallelism's collectives stay in step), and every rank gets
all predictions back in the split's order, as one process would make them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mm_moe.errors import InputError
from mm_moe.model import BEiT3ForCaptioning, BEiT3ForNLVR2, BEiT3ForVQA
from mm_moe.model.generation import BeamConfig, CaptionDecoder


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under torch.distributed, (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Rank `rank`'s contiguous slice of n items, padded with item n - 1 to ceil(n / world) items (every rank then
    runs the same batches), and how many of them are its own."""
    size = -(-n // world)
    own = list(range(min(n, rank * size), min(n, (rank + 1) * size)))
    return own + [n - 1] * (size - len(own)), len(own)


class _Slice(Dataset):
    """Items `indices` of an evaluation dataset, with its collate and source."""

    def __init__(self, ds: Any, indices: list[int]) -> None:
        self.ds, self.indices = ds, indices
        self.collate, self.source = ds.collate, getattr(ds, "source", type(ds).__name__)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.ds[self.indices[i]]


def _batches(ds: Any, batch_size: int, desc: str) -> Iterator[dict]:
    """The evaluation batches of `ds`; an item that could not be read (logged with its cause) is an error here:
    every item of an evaluation split must be scored."""
    for batch in tqdm(DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate), desc=desc, unit="batch", leave=False):
        if batch.get("num_skipped"):
            raise InputError(f"{getattr(ds, 'source', desc)}: {batch['num_skipped']} evaluation item(s) could not be "
                             "read (see the skipped-sample warning above); every item must be scored")
        yield batch


def _predict(ds: Any, batch_size: int, desc: str, per_batch: Callable[[dict], list]) -> list:
    """One prediction per item of `ds`, in its order: this rank's slice predicted here, all slices gathered."""
    rank, world = rank_and_world()
    if world == 1:
        return [p for b in _batches(ds, batch_size, desc) for p in per_batch(b)]
    indices, own = shard_indices(len(ds), rank, world)
    mine = [p for b in _batches(_Slice(ds, indices), batch_size, desc) for p in per_batch(b)][:own]
    slices: list[list] = [[] for _ in range(world)]
    dist.all_gather_object(slices, mine)
    return [p for part in slices for p in part]


@torch.no_grad()
def vqa_predictions(model: BEiT3ForVQA, ds: Dataset, answers: list[str], batch_size: int,
                    device: torch.device) -> list[dict]:
    """[{"question_id", "answer"}] for every question of a VQADataset (argmax over the answer vocabulary)."""
    model.eval()

    def per_batch(b: dict) -> list[dict]:
        logits = model(b["images"].to(device), b["text_ids"].to(device), b["text_padding"].to(device)).logits
        return [{"question_id": q, "answer": answers[i]}
                for q, i in zip(b["question_ids"], logits.argmax(1).tolist(), strict=True)]

    return _predict(ds, batch_size, "vqa eval", per_batch)


@torch.no_grad()
def nlvr2_predictions(model: BEiT3ForNLVR2, ds: Dataset, batch_size: int, device: torch.device) -> dict[str, bool]:
    """identifier -> predicted truth for every statement of an NLVR2Dataset."""
    model.eval()

    def per_batch(b: dict) -> list[tuple[str, bool]]:
        logits = model(b["images_left"].to(device), b["images_right"].to(device), b["text_ids"].to(device),
                       b["text_padding"].to(device)).logits
        return list(zip(b["identifiers"], (logits.argmax(1) == 1).tolist(), strict=True))

    return dict(_predict(ds, batch_size, "nlvr2 eval", per_batch))


@torch.no_grad()
def caption_predictions(model: BEiT3ForCaptioning, ds: Dataset, tokenizer: Any, beam: BeamConfig, batch_size: int,
                        device: torch.device) -> list[dict]:
    """COCO caption results [{"image_id", "caption"}] of a per-image CaptionDataset, by beam search (ranks decode
    until all of them are done, so that their forwards stay in step)."""
    decoder = CaptionDecoder(model.to(device), tokenizer, beam, in_step=rank_and_world()[1] > 1)

    def per_batch(b: dict) -> list[dict]:
        return [{"image_id": i, "caption": c}
                for i, c in zip(b["image_ids"], decoder.captions(b["images"].to(device)), strict=True)]

    return _predict(ds, batch_size, "caption eval", per_batch)


__all__ = ["vqa_predictions", "nlvr2_predictions", "caption_predictions", "rank_and_world",
           "shard_indices"]
