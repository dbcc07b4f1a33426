"""The pretraining sample stream of local webdataset shards as a function of (seed, epoch, global position) alone.

Every sample of every shard has a global position in each epoch: the shards in an order drawn from (seed, epoch),
their samples in file order, then every window of `shuffle_buffer` consecutive positions permuted by
(seed, epoch, window). Step s takes positions [s G, (s + 1) G) for the global batch of G = batch_size x world x
grad_accum samples, cut into micro-batches of batch_size: rank r's a-th micro-batch of the step is the
(a x world + r)-th. So which samples make a step, and in which micro-batches, does not depend on the number of
processes, DataLoader workers or the accumulation split, and a run resumed on another number of processes continues
the same batches. A rank reads its samples where they lie (a per-shard index of sample offsets, built once and
cached), seeking forward within the few shards a window spans: 1 / world of the bytes, read almost in order.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mm_moe.config import BEiT3Config, PretrainDataConfig
from mm_moe.constants import IGNORE_INDEX
from mm_moe.data.common import epoch_seed, pad
from mm_moe.data.shards import IMAGE_EXTS, Collate, PretrainSample, describe_shards
from mm_moe.data.skips import SampleError, SkipCounter
from mm_moe.data.transforms import seed_of
from mm_moe.errors import InputError

log = logging.getLogger(__name__)
INDEX_DIR = ".mm_moe_index"


def _key_and_ext(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_shard(path: str | Path) -> np.ndarray:
    """Int64[n, 2]: byte offset of each sample's first member header and its member count, in file order (the
    samples webdataset reads: consecutive files of one key). A tar cut short keeps the samples before the cut."""
    rows: list[list[int]] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key = _key_and_ext(member.name)[0]
                if key == last:
                    rows[-1][1] += 1
                else:
                    rows.append([member.offset, 1])
                    last = key
    except (tarfile.TarError, EOFError, OSError) as err:
        log.warning("%s: unreadable after %d sample(s) (%s); indexing those", path, len(rows), err)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _user_cache(shard: Path) -> Path:
    """The index folder of a shard folder that cannot be written: under the user's cache, named by its path."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mm_moe" / "shard_index"
    return root / str(shard.parent.resolve()).strip("/").replace("/", "_")


class ShardIndex:
    """The per-shard sample offsets of local shards, cached as .npy files (memory-mapped when read) in a
    `.mm_moe_index` folder beside the shards, or under the user's cache where that folder cannot be written. A cache
    entry names the shard's size and modification time: a shard rewritten since is indexed again."""

    def __init__(self, urls: list[str], key: str = "pretrain_data.shards") -> None:
        self.urls = urls
        self.offsets = [self._load(Path(u)) for u in urls]
        self.counts = np.array([len(o) for o in self.offsets], dtype=np.int64)
        if not self.counts.sum():
            raise InputError(f"{key}={describe_shards(urls)}: no sample in any shard")

    @staticmethod
    def _load(shard: Path) -> np.ndarray:
        st = shard.stat()
        name = f"{shard.name}.{st.st_size}.{st.st_mtime_ns}.npy"
        folders = (shard.parent / INDEX_DIR, _user_cache(shard))
        for folder in folders:
            if (folder / name).is_file():
                return np.load(folder / name, mmap_mode="r", allow_pickle=False)
        rows = index_shard(shard)
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{name}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, rows, allow_pickle=False)
                os.replace(tmp, folder / name)  # atomic: ranks indexing the same shard at once are harmless
                break
            except OSError:
                continue
        return rows


class GlobalOrder:
    """Epoch `epoch`'s sample at each global position: (shard number, sample number in the shard)."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int, window: int) -> None:
        self.seed, self.window = epoch_seed(seed, epoch), max(1, window)
        self.shards = np.random.default_rng([self.seed, 0]).permutation(len(counts))
        self.ends = np.cumsum(counts[self.shards])
        self.size = int(self.ends[-1])
        self._window = lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, w: int) -> np.ndarray:
        length = min(self.window, self.size - w * self.window)
        return np.random.default_rng([self.seed, 1, w]).permutation(length)

    def __getitem__(self, position: int) -> tuple[int, int]:
        w, i = divmod(position, self.window)
        p = w * self.window + int(self._window(w)[i])
        slot = int(np.searchsorted(self.ends, p, side="right"))
        return int(self.shards[slot]), p - int(self.ends[slot - 1] if slot else 0)


def read_sample(url: str, offset: int, members: int) -> dict[str, Any]:
    """A webdataset-style sample ({"__key__", "__url__", ext: value}) read from its place in a shard; a field that
    cannot be decoded is a SampleError naming shard, key and field."""
    sample: dict[str, Any] = {"__url__": url}
    with open(url, "rb") as f:
        f.seek(offset)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            read = 0
            while read < members:
                member = tar.next()
                if member is None:
                    raise SampleError(f"{url}: truncated at sample offset {offset}")
                if not member.isfile():
                    continue
                read += 1
                key, ext = _key_and_ext(member.name)
                sample["__key__"] = key
                try:
                    sample[ext.lower()] = _decode(ext.lower(), tar.extractfile(member).read())
                except (OSError, ValueError, Image.DecompressionBombError) as err:
                    raise SampleError(f"{url}: sample {key!r}, field {ext!r}: {type(err).__name__}: {err}") from err
    return sample


def _decode(ext: str, data: bytes) -> Any:
    """A member's value as webdataset's "pil" decoder gives it: images as (lazy) PIL images, .txt as text, .json
    parsed, other files as bytes."""
    if ext in IMAGE_EXTS:
        return Image.open(io.BytesIO(data))
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    return data


def _read_prepared(index: ShardIndex, shard: int, j: int, prepare: PretrainSample, part: str,
                   skips: SkipCounter) -> dict | None:
    """Sample j of shard `shard`, read and prepared as `part`; None (skipped and counted) when it is broken."""
    url = index.urls[shard]
    offset, members = (int(v) for v in index.offsets[shard][j])
    try:
        return prepare(read_sample(url, offset, members), part)
    except (SampleError, OSError, tarfile.TarError) as err:
        skips(err if isinstance(err, SampleError) else SampleError(f"{url}: sample at {offset}: {err}"))
        return None


class MonomodalMix:
    """BEiT-3's monomodal data beside the pairs: the MIM pass's images and the MLM pass's texts of global
    micro-batch g are the pairs' own but for the last `per_batch` of each, taken from image-only / text-only shards
    at positions [g x per_batch, (g + 1) x per_batch) of that source's own endless order (epochs of its own, each
    drawn as the pairs' are). A function of g alone: the same at any world size and after a resume."""

    def __init__(self, sources: dict[str, ShardIndex], data: PretrainDataConfig, batch_size: int, seed: int,
                 prepare: PretrainSample, pad_id: int, skips: SkipCounter) -> None:
        self.sources, self.window, self.seed = sources, data.shuffle_buffer, seed
        self.per_batch = int(data.monomodal_share * batch_size + 0.5)
        self.keep = batch_size - self.per_batch
        self.prepare, self.pad_id, self.skips = prepare, pad_id, skips
        self._order = lru_cache(maxsize=4)(self._make_order)

    def _make_order(self, part: str, epoch: int) -> GlobalOrder:
        return GlobalOrder(self.sources[part].counts, seed_of(self.seed, part) % 2**31, epoch, self.window)

    def _samples(self, part: str, g: int) -> list[dict]:
        index, out = self.sources[part], []
        size = int(index.counts.sum())
        for n in range(g * self.per_batch, (g + 1) * self.per_batch):
            epoch, position = divmod(n, size)
            if (sample := _read_prepared(index, *self._order(part, epoch)[position], self.prepare, part,
                                         self.skips)) is not None:
                out.append(sample)
        return out

    def __call__(self, g: int, pairs: list[dict]) -> dict:
        """The pass inputs of global micro-batch g whose pair samples are `pairs`: mim_images / mim_patch_mask /
        mim_keys, and mlm_text_ids (masked) / mlm_text_padding / mlm_text_labels / mlm_keys, for the sources given."""
        out: dict = {}
        if "image" in self.sources:
            mixed = pairs[:self.keep] + self._samples("image", g)
            out |= {"mim_images": torch.stack([s["image"] for s in mixed]),
                    "mim_patch_mask": torch.stack([s["patch_mask"] for s in mixed]), "mim_keys": [s["key"] for s in mixed]}
        if "text" in self.sources:
            mixed = pairs[:self.keep] + self._samples("text", g)
            out |= {"mlm_text_ids": pad([s["masked_ids"] for s in mixed], self.pad_id),
                    "mlm_text_padding": pad([s["text_ids"] for s in mixed], self.pad_id) == self.pad_id,
                    "mlm_text_labels": pad([s["mlm_labels"] for s in mixed], IGNORE_INDEX),
                    "mlm_keys": [s["key"] for s in mixed]}
        return out


class RankBatches(Dataset):
    """Rank `rank`'s micro-batches of one epoch, item k being its k-th: a map-style dataset, so DataLoader workers
    share them out and keep their order, and a resume starts at any k without reading what came before.
    `monomodal`: image-only ("image") and text-only ("text") shards mixed into the MIM and MLM passes
    (`MonomodalMix`)."""

    def __init__(self, index: ShardIndex, tokenizer: Any, data: PretrainDataConfig, model: BEiT3Config, *,
                 batch_size: int, seed: int, epoch: int, rank: int, world: int, accum: int, augment: bool = True,
                 monomodal: dict[str, ShardIndex] | None = None) -> None:
        self.index, self.batch_size, self.rank, self.world, self.accum = index, batch_size, rank, world, accum
        self.epoch = epoch
        self.order = GlobalOrder(index.counts, seed, epoch, data.shuffle_buffer)
        self.steps = self.order.size // (batch_size * world * accum)
        if not self.steps:
            raise InputError(f"pretrain_data.shards={describe_shards(index.urls)}: {self.order.size} samples make no "
                             f"global batch of {batch_size} x {world} process(es) x {accum} accumulation steps")
        self.prepare = PretrainSample(tokenizer, data, model, epoch_seed(seed, epoch), augment)
        self.skips = SkipCounter(describe_shards(index.urls))
        self.collate = Collate(tokenizer.pad_token_id, self.skips)
        self.mix = MonomodalMix(monomodal, data, batch_size, seed, self.prepare, tokenizer.pad_token_id,
                                self.skips) if monomodal else None

    def __len__(self) -> int:
        return self.steps * self.accum

    def chunk(self, k: int) -> int:
        """The global micro-batch number of this rank's k-th micro-batch."""
        step, a = divmod(k, self.accum)
        return (step * self.accum + a) * self.world + self.rank

    def __getitem__(self, k: int) -> dict:
        first = self.chunk(k) * self.batch_size
        samples = [s for position in range(first, first + self.batch_size)
                   if (s := _read_prepared(self.index, *self.order[position], self.prepare, "pair", self.skips)) is not None]
        if not samples:  # the trainer passes over it, counting the skips; `IndexedEpoch` keeps the causes
            return {"num_skipped": self.skips.take(), "failures": self.skips.first[:3]}
        # the mix goes by the micro-batch's number counted over every epoch so far
        mixed = self.mix(self.epoch * self.steps * self.accum * self.world + self.chunk(k), samples) if self.mix else {}
        return self.collate(samples) | mixed


class IndexedEpoch:
    """One epoch of a rank's micro-batches; `starting_at(k)` skips the first k without reading them. An epoch in
    which no sample could be read is an InputError naming the shards and the first failures."""

    def __init__(self, batches: RankBatches, num_workers: int, worker_init_fn: Any = None) -> None:
        self.batches, self.num_workers, self.worker_init_fn = batches, num_workers, worker_init_fn

    def starting_at(self, k: int) -> Iterator[dict]:
        loader = DataLoader(self.batches, batch_size=None, sampler=range(k, len(self.batches)),
                            num_workers=self.num_workers, worker_init_fn=self.worker_init_fn)
        failures, readable = [], False
        for batch in loader:
            failures += batch.pop("failures", [])
            readable = readable or "keys" in batch
            yield batch
        if not readable and k == 0:
            raise InputError(f"pretrain_data.shards={describe_shards(self.batches.index.urls)}: no sample could be read "
                             f"in this epoch (rank {self.batches.rank}); first failures: {'; '.join(failures[:3])}")

    def __iter__(self) -> Iterator[dict]:
        return self.starting_at(0)

    def __len__(self) -> int:
        return len(self.batches)


def local_shards(urls: list[str]) -> bool:
    """Whether every shard is a local file (read by global position); remote ones (http, pipe:) are streamed."""
    return all("://" not in u and not u.startswith("pipe:") for u in urls)


__all__ = ["index_shard", "ShardIndex", "GlobalOrder", "read_sample", "MonomodalMix", "RankBatches", "IndexedEpoch",
           "local_shards", "INDEX_DIR"]
