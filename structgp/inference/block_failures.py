"""Naming the blocks of a :class:`~structgp.covariance.BlockDiag` that are not positive definite.

A group of stacked blocks is factorised in one batched call, so a failure says only that some block of the
group failed. :func:`not_positive_definite` turns it into an error that lists the failing blocks (indices
in the order the blocks were given); the blockwise engine and the ``BlockDiag`` root rule both raise it.
"""

from __future__ import annotations

import torch

from structgp import _config
from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.errors import DensifyError
from structgp.covariance.operator import Operator
from structgp.inference.cholesky import NotPositiveDefiniteError
from structgp.inference.plan import describe

_SHOWN = 10  # blocks listed in an error message


def not_positive_definite(op: BlockDiag, j: int, err: NotPositiveDefiniteError) -> NotPositiveDefiniteError:
    """The error for group ``j`` of ``op`` failing with ``err``, naming the blocks that fail."""
    blocks = failing_blocks(op, j)
    shown = ", ".join(map(str, blocks[:_SHOWN])) + (", ..." if len(blocks) > _SHOWN else "")
    return NotPositiveDefiniteError(
        f"block(s) [{shown}] of {op!r} are not positive definite (group {j}: {describe_group(op, j)}); {err}"
    )


def describe_group(op: BlockDiag, j: int) -> str:
    """Group ``j`` in words, e.g. ``"3 x Dense of size 4"``."""
    g = op.groups[j]
    return f"{blocks_in(g)} x {describe(g)} of size {g.n}"


def blocks_in(group: Operator) -> int:
    """The number of blocks stacked in ``group`` (its last batch dim)."""
    return group.batch_shape[-1]


def failing_blocks(op: BlockDiag, j: int) -> list[int]:
    """The blocks of group ``j`` (indices in the order given) that fail a Cholesky factorisation even with
    the largest jitter ``settings(max_jitter=...)``; all of them when that cannot be told densely."""
    members = op.group_blocks()[j]
    try:
        with torch.no_grad():
            a = op.groups[j].to_dense()
    except DensifyError:
        return list(members)
    a = (a + a.mT) / 2
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(torch.finfo(a.dtype).tiny)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    info = torch.linalg.cholesky_ex(a + _config.current().max_jitter * scale[..., None, None] * eye).info
    failed = (info > 0).flatten(0, -2).any(0) if info.dim() > 1 else info > 0
    bad = [members[t] for t in failed.nonzero().flatten().tolist()]
    return bad or list(members)
