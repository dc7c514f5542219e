"""A cheap check that every rank holds the same data and settings before a distributed computation."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor

from structgp.distributed import process_group
from structgp.distributed.errors import DistributedError, explained


def check_consistent(**values: object) -> None:
    """Raise a :class:`DistributedError` on every rank when some rank's value of a name differs from rank
    0's (e.g. ``check_consistent(train_x=x, train_y=y, settings=sg.settings.current())``); a no-op without
    an active process group.

    Each value is hashed locally (a tensor by dtype, shape and bytes; a list or tuple by its items; anything
    else by ``repr``) and one all-gather of 8 bytes a name compares the hashes."""
    if not process_group.is_active() or not values:
        return
    names = sorted(values)
    local = torch.tensor([_digest(values[name]) for name in names], dtype=torch.int64, device=process_group.device())
    world, rank = process_group.world(), process_group.rank()
    parts = [torch.empty_like(local) for _ in range(world)]
    with explained(f"comparing {', '.join(names)} across ranks", rank, world):
        dist.all_gather(parts, local)
    for r, other in enumerate(parts[1:], start=1):
        differ = [name for name, a, b in zip(names, parts[0].tolist(), other.tolist()) if a != b]
        if differ:
            raise DistributedError(
                f"rank {r}'s {', '.join(differ)} differ{'s' if len(differ) == 1 else ''} from rank 0's: every rank "
                "must hold the same data, hyperparameters and settings"
            )


def _digest(value: object) -> int:
    h = hashlib.blake2b(digest_size=8)
    _feed(h, value)
    return int.from_bytes(h.digest(), "little", signed=True)


def _feed(h, value: object) -> None:
    if isinstance(value, Tensor) and value.layout != torch.strided:  # sparse: its index and value tensors
        h.update(str(value.layout).encode())
        sparse = value.detach().coalesce() if value.layout == torch.sparse_coo else value.detach()
        coo = value.layout == torch.sparse_coo
        parts = [sparse.indices()] if coo else [sparse.crow_indices(), sparse.col_indices()]
        _feed(h, [*parts, sparse.values(), tuple(value.shape)])
    elif isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, list | tuple):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(repr(value).encode())
