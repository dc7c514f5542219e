"""GroupKernel: independent blocks by a group label -> ``BlockDiag``.

``k((x, g), (x', g')) = k_0(x, x') [g = g']``: points in different groups are independent, so the
covariance of data sorted by group is ``diag(K_1, ..., K_b)`` with ``K_i = k_0(x_i, x_i)`` (equal-size
groups: one ``(b, m, m)`` stack, one batched Cholesky; ragged groups: stacked by size).
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from structgp.covariance import BlockDiag
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
    integer-valued labels. Training inputs must list each group's rows contiguously (sort them by label,
    e.g. ``x[x[:, -1].argsort(stable=True)]``), else ``ValueError``. Test inputs may come in any order.
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel, group_column: int = -1) -> None:
        super().__init__()
        self.base_kernel = check_gpytorch_kernel(base_kernel, "base_kernel")
        if len(getattr(base_kernel, "batch_shape", ())) > 0:
            raise ValueError("base_kernel: GroupKernel takes an unbatched base kernel (its batch_shape must be ())")
        if not isinstance(group_column, int):
            raise TypeError(f"group_column: expected an int, got {type(group_column).__name__}")
        self.group_column = group_column
        self._train = InputMemo()  # group sizes of the training inputs

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
        self._train.get(x, lambda: group_sizes(self.split(x)[1], name))
        return x

    def forward(self, x: Tensor) -> BlockDiag:
        sizes = self._train.get(x, lambda: group_sizes(self.split(x)[1], "x"))
        features = self.split(x)[0]
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


def group_sizes(labels: Tensor, name: str) -> list[int]:
    """The sizes of the contiguous runs of equal labels; ``ValueError`` if a label occurs in two runs."""
    runs, counts = torch.unique_consecutive(labels, return_counts=True)
    if runs.unique().shape[0] != runs.shape[0]:
        raise ValueError(
            f"{name}: the rows of each group must be contiguous (a label occurs in {runs.shape[0]} runs but "
            f"there are {runs.unique().shape[0]} groups); sort the data by label first"
        )
    return counts.tolist()
