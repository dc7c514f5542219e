"""A structgp pytree (operator or linear map) as the flat tuple of tensors a ``LinearOperator`` holds.

linear_operator keeps a ``LinearOperator``'s data as positional tensors (its ``representation()``) and
rebuilds the object from them inside its autograd functions. A structgp pytree can also have leaves that
are not tensors — ``None`` for an absent permutation (``BlockDiag.perm`` in natural order) — and integer
index tensors (a ``SparseLifted`` lift's ``crow``/``col``). :func:`flatten` keeps only the tensors as
leaves and records everything else in a :class:`TensorLayout`, which puts the tree back together; the
helpers below answer ``dtype`` and ``.to(...)`` from the floating tensors only, because linear_operator's
defaults read the first tensor (an integer ``crow``) and cast every tensor (breaking index tensors).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor


class TensorLayout:
    """The tree structure of a pytree and its non-tensor leaves (with their positions among all leaves).

    spec: the pytree's ``TreeSpec``; statics: ``(position, value)`` of each non-tensor leaf, ascending.
    """

    def __init__(self, spec: pytree.TreeSpec, statics: tuple[tuple[int, Any], ...]) -> None:
        self.spec = spec
        self.statics = statics

    def unflatten(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> Any:
        """The pytree with ``tensors`` (in flattening order) as its tensor leaves."""
        leaves = list(tensors)
        for position, value in self.statics:  # ascending positions: each insert lands where it was
            leaves.insert(position, value)
        return pytree.tree_unflatten(leaves, self.spec)

    def __repr__(self) -> str:
        return f"TensorLayout({self.spec.num_leaves} leaves, {len(self.statics)} not tensors)"


def flatten(tree: Any) -> tuple[list[Tensor], TensorLayout]:
    """``(tensor leaves, layout)`` of a pytree; ``layout.unflatten(tensors)`` rebuilds it."""
    leaves, spec = pytree.tree_flatten(tree)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    statics = tuple((i, leaf) for i, leaf in enumerate(leaves) if not isinstance(leaf, Tensor))
    return tensors, TensorLayout(spec, statics)


def floating_dtype(tensors: tuple[Tensor, ...]) -> torch.dtype:
    """The dtype of the first floating tensor (the data; integer tensors are indices)."""
    for t in tensors:
        if t.is_floating_point():
            return t.dtype
    raise TypeError("expected at least one floating-point tensor among the operator's tensors")


def moved(tensors: tuple[Tensor, ...], device: torch.device | None, dtype: torch.dtype | None) -> list[Tensor]:
    """``tensors`` moved to ``device``; floating ones cast to ``dtype``, integer (index) ones kept exact."""
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in tensors]
