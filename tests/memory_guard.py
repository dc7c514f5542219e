"""A dispatch-mode allocation guard: the largest tensor every aten op returns inside the context.

Sparse outputs count their stored entries, dense ones every element, so a test can assert that no op of a
large-scale path produced anything ``n_out x n_out``, dense ``n_out x n_in`` or ``n_in x n_in`` (pick a size
where those are far above what the path legitimately holds).
"""

from __future__ import annotations

import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_SPARSE = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def stored_elements(t: torch.Tensor) -> int:
    """Entries ``t`` holds: ``nnz`` for a sparse tensor, ``numel`` for a dense one."""
    return int(t._nnz()) if t.layout in _SPARSE else t.numel()


class LargestOutput(TorchDispatchMode):
    """Records the largest output of any aten op run inside the context (``largest`` elements, its op and
    shape in ``where``)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.where = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                size = stored_elements(t)
                if size > self.largest:
                    self.largest, self.where = size, f"{func} -> {tuple(t.shape)} ({t.layout})"
        return out


class LivePeak(TorchDispatchMode):
    """The peak bytes of live tensor storage created by aten ops inside the context (``peak``): each output's
    storage counted once, from its creation until it is freed. Sparse and other non-strided outputs are left
    out; storage created before the context is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.live:
                continue
            self.live[ptr] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, ptr)
        return out
