"""GroupKernel: independent blocks by a group label -> ``BlockDiag`` (or ``Permuted(BlockDiag)``).

``k((x, g), (x', g')) = k_0(x, x') [g = g']``: points in different groups are independent, so the
covariance of data sorted by group is ``diag(K_1, ..., K_b)`` with ``K_i = k_0(x_i, x_i)`` (equal-size
groups: one ``(b, m, m)`` stack, one batched Cholesky; ragged groups: stacked by size).

Training rows may come in any order. When each group's rows are contiguous the covariance is that
``BlockDiag`` itself; otherwise the rows are sorted by label (a stable argsort ``order``), the ``BlockDiag``
``B`` is built on the sorted rows and the covariance is ``Permuted(B, perm)`` with ``perm = order^{-1}``
(``perm[i]`` is the sorted position of row ``i``, so ``K[i, j] = B[perm[i], perm[j]]``): exact, still one
batched Cholesky per stack of equal-size groups, the data's own order kept for the user.
"""

from __future__ import annotations

import dataclasses

import gpytorch
import torch
from torch import Tensor

from structgp.covariance import BlockDiag, Permuted
from structgp.kernels.base import (
    InputMemo,
    Kernel,
    as_inputs,
    check_gpytorch_kernel,
    evaluate,
    evaluate_diag,
    symmetrize,
)


class GroupKernel(Kernel):
    """``k_0(x, x') [g = g']`` with the group label ``g`` in column ``group_column`` of the inputs.

    base_kernel: a gpytorch kernel over the other columns (unbatched); group_column: the column holding
    integer-valued labels. Training and test inputs may come in any order: ``kernel(x)`` is a ``BlockDiag``
    when each group's rows are contiguous, else ``Permuted(BlockDiag on the rows sorted by label, perm)``
    (the same matrix, rows in the order given). Groups are ordered by first appearance when contiguous and
    by label value otherwise.
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel, group_column: int = -1) -> None:
        super().__init__()
        self.base_kernel = check_gpytorch_kernel(base_kernel, "base_kernel")
        if len(getattr(base_kernel, "batch_shape", ())) > 0:
            raise ValueError("base_kernel: GroupKernel takes an unbatched base kernel (its batch_shape must be ())")
        if not isinstance(group_column, int):
            raise TypeError(f"group_column: expected an int, got {type(group_column).__name__}")
        self.group_column = group_column
        self._train = InputMemo()  # the group layout of the training inputs

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features (n, d - 1), labels (n,))``."""
        col = self.group_column % x.shape[-1]
        keep = [j for j in range(x.shape[-1]) if j != col]
        return x[:, keep], x[:, col]

    def check_test_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = as_inputs(x, name)
        if x.dim() != 2 or x.shape[-1] < 2:
            raise ValueError(
                f"{name}: expected (n, d) inputs with features and a group label column, got {tuple(x.shape)}"
            )
        labels = self.split(x)[1]
        if not bool((labels == labels.round()).all()):
            raise ValueError(f"{name}: expected integer-valued group labels in column {self.group_column}")
        return x

    def check_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = self.check_test_inputs(x, name)
        self._train.get(x, lambda: group_layout(self.split(x)[1]))
        return x

    def forward(self, x: Tensor) -> BlockDiag | Permuted:
        layout = self._train.get(x, lambda: group_layout(self.split(x)[1]))
        features = self.split(x)[0]
        if layout.order is not None:
            features = features.index_select(-2, layout.order)
        blocks = self._blocks(features, layout.sizes)
        return blocks if layout.perm is None else Permuted(blocks, layout.perm)

    def _blocks(self, features: Tensor, sizes: list[int]) -> BlockDiag:
        """``diag(K_1, ..., K_b)`` for features whose groups are contiguous runs of ``sizes`` rows."""
        if len(set(sizes)) == 1:
            stacked = features.reshape(len(sizes), sizes[0], features.shape[-1])
            return BlockDiag(symmetrize(evaluate(self.base_kernel, stacked)))
        return BlockDiag(self._ragged_blocks(features, sizes))

    def _ragged_blocks(self, features: Tensor, sizes: list[int]) -> list[Tensor]:
        """One dense block per group; groups of one size are evaluated in one batched call."""
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        blocks: list[Tensor | None] = [None] * len(sizes)
        for size in sorted(set(sizes)):
            members = [i for i, s in enumerate(sizes) if s == size]
            rows = torch.stack([torch.arange(starts[i], starts[i] + size, device=features.device) for i in members])
            mats = symmetrize(evaluate(self.base_kernel, features[rows]))
            for i, mat in zip(members, mats.unbind(0)):
                blocks[i] = mat
        return blocks

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        (f1, g1), (f2, g2) = self.split(x1), self.split(x2)
        same = g1.unsqueeze(-1) == g2.unsqueeze(-2)
        return evaluate(self.base_kernel, f1, f2) * same.to(f1.dtype)

    def prior_diagonal(self, x: Tensor) -> Tensor:
        return evaluate_diag(self.base_kernel, self.split(x)[0])


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Where the groups of the training rows lie.

    sizes: the rows of each group, groups in block order; order: ``(n,)`` int64, the rows sorted by label
    (a stable argsort) or None when each group is already contiguous; perm: ``(n,)`` int64, its inverse
    (``perm[order[k]] = k``: the sorted position of each row), or None.
    """

    sizes: list[int]
    order: Tensor | None = None
    perm: Tensor | None = None


def group_layout(labels: Tensor) -> GroupLayout:
    """The layout of ``labels`` ``(n,)``: contiguous runs as they are, else sorted by a stable argsort."""
    runs, counts = torch.unique_consecutive(labels, return_counts=True)
    if runs.unique().shape[0] == runs.shape[0]:  # each label in one run: no permutation needed
        return GroupLayout(counts.tolist())
    order = torch.argsort(labels, stable=True)
    counts = torch.unique_consecutive(labels.index_select(0, order), return_counts=True)[1]
    return GroupLayout(counts.tolist(), order, torch.argsort(order))
