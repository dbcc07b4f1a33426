"""Memory for training and benchmarks: keep freed CPU memory for reuse (glibc); count the bytes saved for backward."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks under `threshold` bytes for reuse instead of unmapping them.

    By default glibc gives every freed block over 32 MB back to the OS, so each CPU training step
    page-faults its big tensors in again (MoE expert gradients are E / top-k times a dense FFN's): 0.28-0.55 s
    of kernel time per forward + backward of one d=768 MoE layer over 4096 tokens. CUDA's caching allocator
    keeps freed memory the same way on GPU.
    Returns False where it does not apply (not Linux/glibc).
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class SavedForBackward:
    """Counts what autograd keeps for backward of the graph built under `with`: the bytes of the distinct storages
    saved (a tensor saved twice, or a view of one, counts once), leaving out `exclude` (the parameters). Exact and
    the same on any machine, unlike the allocator's peak; read `.bytes` after the block."""

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedForBackward:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


__all__ = ["keep_freed_memory", "SavedForBackward"]
