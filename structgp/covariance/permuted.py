"""Permuted: a covariance whose rows (and columns) are a relabelling of a structured one, ``P B P^T``.

Convention: for ``perm`` a permutation of ``range(n)`` (an int64 tensor ``(n,)``),

    (P B P^T)[i, j] = B[perm[i], perm[j]],      (P x)[i] = x[perm[i]],      (P^T y)[perm[i]] = y[i],

so row ``i`` of the permuted matrix is row ``perm[i]`` of the base ``B``. Data listed in any order whose
covariance is structured once sorted (groups -> ``BlockDiag``) is ``Permuted(B_sorted, perm)`` with
``perm[i]`` the sorted position of data row ``i``. Products, the diagonal and the dense form are gathers
(``perm`` and its inverse are both held, so each direction is one ``index_select``); ``solve``/``logdet``
go to the base's own method (:mod:`structgp.inference.permuted`): ``P B^{-1} P^T`` and ``log det B``.

``Permuted + Diagonal`` / ``+ ScaledIdentity`` is ``Permuted(B + P^T D P, perm)``: the noise moves into the
base's row order, so the base keeps its structure (a ``BlockDiag`` stays a ``BlockDiag``).

``perm`` and ``inverse`` are integer tensor children: ``Operator.to`` keeps their dtype, autograd and
``_first_float`` skip them, and they are unbatched (the base carries the batch dims).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.linear_map import Permutation
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.validation import value_checks_enabled


class Permuted(Operator):
    """``P B P^T`` ``(..., n, n)``: ``(P B P^T)[i, j] = B[perm[i], perm[j]]``.

    base: an operator (or a dense SPD tensor) ``(..., n, n)``; perm: a 1-D int64 tensor ``(n,)`` holding a
    permutation of ``range(n)``, on the base's device. A ``Permuted`` base is flattened (one gather).
    """

    _children = ("base", "perm", "inverse")

    def __init__(self, base: Operator | Tensor, perm: Tensor) -> None:
        super().__init__()
        base = as_operator(base, "base")
        perm = check_permutation(perm, base.n, base.device, "perm")
        if isinstance(base, Permuted):  # B'[i, j] = B[p1[p2[i]], p1[p2[j]]]
            base, perm = base.base, base.perm.index_select(0, perm)
        self.base = base
        self.perm = perm
        self.inverse = torch.argsort(perm)

    # -- layout -------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def is_diagonal(self) -> bool:
        return self.base.is_diagonal

    def permutation(self) -> Permutation:
        """The map ``P`` ``(n, n)`` with ``(P x)[i] = x[perm[i]]`` (so ``self = P B P^T``)."""
        return Permutation._from_children([self.perm, self.inverse], (self.n, self.dtype))

    def to_base_order(self, x: Tensor) -> Tensor:
        """``P^T x`` for ``x`` ``(..., n, c)``: the rows of ``x`` in the base's order."""
        return gather_rows(x, self.inverse)

    def from_base_order(self, y: Tensor) -> Tensor:
        """``P y`` for ``y`` ``(..., n, c)``: rows in the base's order back to this operator's order."""
        return gather_rows(y, self.perm)

    # -- structured algebra -------------------------------------------------------------------------
    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.from_base_order(self.base._matmul(self.to_base_order(rhs)))

    def diagonal(self) -> Tensor:
        return self.base.diagonal().index_select(-1, self.perm)

    def _to_dense(self) -> Tensor:
        return self.base._to_dense().index_select(-2, self.perm).index_select(-1, self.perm)

    def _scale(self, c: Tensor) -> Permuted:
        return self._replace(base=self.base._scale(c))

    def _expand(self, batch_shape: torch.Size) -> Permuted:
        return self._replace(base=self.base._expand(batch_shape))

    def _add_diagonal(self, noise: Operator) -> Operator:
        """``P B P^T + D = P (B + P^T D P) P^T``: the noise in the base's row order, added to the base."""
        from structgp.covariance.sum import add

        return self._replace(base=add(self.base, self.noise_to_base_order(noise)))

    def noise_to_base_order(self, noise: Operator) -> Operator:
        """``P^T D P`` for a diagonal ``D``: the diagonal gathered by ``inverse`` (a scaled identity as is)."""
        if isinstance(noise, ScaledIdentity):
            return noise
        if isinstance(noise, Diagonal):
            return noise._replace(diag=noise.diag.index_select(-1, self.inverse))
        return Diagonal(noise.diagonal().index_select(-1, self.inverse))

    def __repr__(self) -> str:
        dims = "x".join(str(s) for s in self.shape)
        return f"Permuted({dims}, {str(self.dtype).replace('torch.', '')}; {self.base!r})"


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[..., index, :]`` for ``x`` ``(..., n, c)``. A transposed view (rows contiguous in memory, e.g. the
    ``k(X, x_*)^T`` of prediction) is gathered along its memory rows: several times faster than a row
    gather through a stride of ``c`` elements, and returned as the same kind of view."""
    if x.dim() >= 2 and x.shape[-1] > 1 and x.stride(-2) == 1 and x.stride(-1) != 1:
        return x.mT.index_select(-1, index).mT
    return x.index_select(-2, index)


def check_permutation(perm: Any, n: int, device: torch.device, name: str) -> Tensor:
    """``perm`` as a validated permutation of ``range(n)``: an int64 tensor ``(n,)`` on ``device``."""
    if not isinstance(perm, Tensor):
        raise TypeError(f"{name}: expected a 1-D int64 (long) tensor, got {type(perm).__name__}")
    if perm.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype torch.int64 (long), got {perm.dtype}")
    if perm.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {perm.layout}")
    if perm.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (the operator's size), got {tuple(perm.shape)}")
    if perm.device != device:
        raise ValueError(f"{name}: expected device {device} (the base's), got {perm.device}")
    if value_checks_enabled(perm) and n:
        inside = bool(((perm >= 0) & (perm < n)).all())
        if not inside or bool((torch.bincount(perm, minlength=n) != 1).any()):
            raise ValueError(f"{name}: expected a permutation of range({n}) (each of 0..{n - 1} exactly once)")
    return perm
