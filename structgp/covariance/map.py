"""The protocol of structured linear maps ``(..., n, k)``: roots, lifts, selections, products.

A linear map is not a covariance: it multiplies ``(..., k, c)`` from the left (``M @ x``) and ``(..., n, c)``
by its transpose (``M.tmatmul(y) = M^T y``). ``op.root()`` returns one (``R`` with ``R R^T = op``, used to
draw samples ``R eps``); :mod:`structgp.covariance.linear_map` has the general maps that compose.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.pytree_node import PyTreeNode
from structgp.covariance.validation import check_dense_size


def guard_map_dense(m: LinearMap, what: str) -> None:
    """Refuse to materialise a map whose dense form exceeds ``settings(dense_limit=...)``."""
    check_dense_size(
        m.shape, m.dtype, f"{what}: the dense form of {m!r}",
        "; use M @ x and M.mT @ y (e.g. R @ eps to sample), or raise structgp.settings(dense_limit=...)",
    )


class LinearMap(PyTreeNode):
    """Base of structured linear maps ``(..., n, k)``."""

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def batch_shape(self) -> torch.Size:
        return self.shape[:-2]

    def _matmul(self, x: Tensor) -> Tensor:
        """``R x`` for ``x`` of shape ``(..., k, c)``."""
        raise NotImplementedError

    def tmatmul(self, y: Tensor) -> Tensor:
        """``R^T y`` for ``y`` of shape ``(..., n, c)``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    @property
    def mT(self) -> LinearMap:
        """The transpose ``R^T`` ``(..., k, n)``, itself a structured map (:mod:`structgp.covariance.linear_map`)."""
        from structgp.covariance.linear_map import transpose

        return transpose(self)

    @property
    def T(self) -> LinearMap:
        """``R^T`` of an unbatched map (as ``Tensor.T``); use ``.mT`` for batched maps."""
        if len(self.shape) != 2:
            raise ValueError(f"T: defined for unbatched (n, k) maps, got shape {tuple(self.shape)}; use .mT")
        return self.mT

    def __rmatmul__(self, y: Tensor) -> Tensor:
        """``y @ R`` for ``y`` ``(..., c, n)`` (or ``(n,)``): ``(R^T y^T)^T``."""
        if y.dim() == 1:
            return self.mT @ y
        return (self.mT @ y.mT).mT

    def __matmul__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):  # a map, root or operator: a lazy product
            from structgp.covariance.linear_map import compose

            return compose(self, x)
        k = self.shape[-1]
        if x.dim() == 1:
            if x.shape[-1] != k:
                raise ValueError(f"x: expected shape ({k},), got {tuple(x.shape)}")
            return self._matmul(x.unsqueeze(-1)).squeeze(-1)
        if x.shape[-2] != k:
            raise ValueError(f"x: expected shape (..., {k}, c), got {tuple(x.shape)}")
        return self._matmul(x)

    def __getitem__(self, index):
        raise TypeError(
            f"{self!r} is a structured linear map (e.g. op[rows], a root), not a tensor: it cannot be indexed. "
            "Index the operator once with rows and columns together (op[rows[:, None], cols], a structured "
            "submatrix), or index M.to_dense()"
        )

    def __len__(self) -> int:
        raise TypeError(f"{self!r} has no len() and is not a sequence: use M.shape, or M.to_dense() for a tensor")

    def __array__(self, *args, **kwargs):
        raise TypeError(f"np.asarray({self!r}): a structured map is not an array; use M.to_dense().numpy()")

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'x'.join(map(str, self.shape))})"
