"""The two collectives a partitioned product needs: gather row blocks, sum gradient contributions.

Both run on the default process group, turn a failure (a timeout, a dead peer) into a
:class:`~structgp.distributed.DistributedError`, and are single-process no-ops without one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from structgp.distributed import process_group
from structgp.distributed.errors import DistributedError, explained


def gather_rows(
    block: Tensor, parts: Sequence[tuple[int, int]], check: Tensor | None = None, what: str = "a product"
) -> Tensor:
    """The full ``(..., n, c)`` result from every rank's row block ``(..., rows, c)`` (rank ``r``'s rows are
    ``parts[r]``, contiguous and in order: :func:`~structgp.distributed.partition`), on every rank.

    Each rank's block is broadcast straight into its rows of the result (one broadcast a rank): the only
    ``(n, c)`` tensor is the result itself (an all-gather needs equal blocks, so padded copies and a join).

    check ``(..., c)``: a summary of the product's input that must be bitwise the same on every rank (the
    right-hand side's column sums); it is gathered first, and a rank whose summary differs from rank 0's
    raises a :class:`DistributedError` on every rank (the ranks have diverged: different data, settings or
    non-deterministic arithmetic) instead of a later mismatched collective."""
    world, rank = process_group.world(), process_group.rank()
    if world == 1:
        return block
    if len(parts) != world:
        raise ValueError(f"parts: expected {world} row ranges (one a rank), got {len(parts)}")
    mine = parts[rank][1] - parts[rank][0]
    if block.shape[-2] != mine:
        raise ValueError(f"block: expected {mine} rows (rank {rank}'s {parts[rank]}), got shape {tuple(block.shape)}")
    with explained(f"gathering the row blocks of {what}", rank, world):
        if check is not None:
            summaries = check.new_empty((world, *check.shape))
            dist.all_gather(list(summaries.unbind(0)), check.contiguous())
            _same_everywhere(list(summaries.unbind(0)), what)
        out = block.new_empty(*block.shape[:-2], parts[-1][1], block.shape[-1])
        for r, (start, stop) in enumerate(parts):  # every part has rows (:func:`partition`)
            rows = out[..., start:stop, :]
            # batched rows are strided in ``out``: they travel through a contiguous buffer
            buffer = rows if rows.is_contiguous() else torch.empty_like(rows, memory_format=torch.contiguous_format)
            if r == rank:
                buffer.copy_(block)
            dist.broadcast(buffer, src=r)
            if buffer is not rows:
                rows.copy_(buffer)
    return out


def all_reduce_sum(tensors: Sequence[Tensor | None], what: str = "gradients") -> list[Tensor | None]:
    """Each tensor summed over the ranks (one all-reduce of them all, flattened); ``None`` stays ``None``."""
    present = [t for t in tensors if t is not None]
    if process_group.world() == 1 or not present:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in present])
    with explained(f"summing {what} over the ranks", process_group.rank(), process_group.world()):
        dist.all_reduce(flat)
    out, offset = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def _same_everywhere(summaries: list[Tensor], what: str) -> None:
    first = summaries[0]
    for r, other in enumerate(summaries[1:], start=1):
        equal = (other == first) | (other.isnan() & first.isnan())
        if not bool(equal.all()):
            raise DistributedError(
                f"rank {r}'s input to {what} differs from rank 0's (the ranks diverged: different data, "
                "settings or hyperparameters, or arithmetic that is not deterministic); every rank must run "
                "the same computation (torch.use_deterministic_algorithms(True) on GPUs)"
            )
