"""Skipping unreadable samples, counted and logged: webdataset's error handler for pretraining shards, and the
same counter for the items of the fine-tuning datasets (`mm_moe.data.common.skipping`)."""

from __future__ import annotations

import logging
import re
import tarfile

from webdataset.autodecode import DecodingError

from mm_moe.errors import InputError

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be used; the message names its shard and key."""


def describe_failure(exn: BaseException) -> str:
    """One line naming the shard, the sample key and the cause of a webdataset failure."""
    if isinstance(exn, SampleError):
        return str(exn)
    if isinstance(exn, DecodingError):
        cause = exn.__cause__
        what = f"{type(cause).__name__}: {cause}" if cause is not None else "undecodable"
        return f"{exn.url}: sample {exn.key!r}, field {exn.k!r}: {what}"
    return f"{type(exn).__name__}: {exn}"


class SkipCounter:
    """A webdataset error handler that logs and counts what it skips (per process).

    Each log line names shard, key and cause; the first `verbose` skips are logged, then every 1000th (with the
    running count), so a broken data set cannot flood the log. A truncated or unreadable tar reaches the
    handler more than once (webdataset reports it from its member iterator and again from its shard
    expander): it counts once per shard. With `patience`, that many skips in a row (no batch in between: a
    resampled stream of unreadable data never ends) is an error.
    """

    def __init__(self, source: str, patience: int | None = None, verbose: int = 10) -> None:
        self.source, self.patience, self.verbose = source, patience, verbose
        self.count = self.total = self.in_a_row = 0
        self.broken_shards: set[str] = set()
        self.first: list[str] = []  # the first failures, for the error of an epoch without a sample

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, tarfile.TarError):
            m = re.search(r"name='([^']+)'", str(exn))
            shard = m.group(1) if m else str(exn)
            if shard in self.broken_shards:
                return True
            self.broken_shards.add(shard)
        self.count, self.total, self.in_a_row = self.count + 1, self.total + 1, self.in_a_row + 1
        what = describe_failure(exn)
        if len(self.first) < 3:
            self.first.append(what)
        if self.total <= self.verbose or self.total % 1000 == 0:
            log.warning("skipped (%d so far in this process): %s", self.total, what)
        if self.patience is not None and self.in_a_row >= self.patience:
            raise InputError(f"pretrain_data.shards={self.source}: {self.in_a_row} samples in a row could not be "
                             f"read; the last: {what}")
        return True

    def take(self) -> int:
        """Skips since the previous call (a batch was made: the run of failures is broken)."""
        n, self.count, self.in_a_row = self.count, 0, 0
        return n


__all__ = ["SampleError", "SkipCounter", "describe_failure"]
