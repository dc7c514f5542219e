"""The preconditioner of a grid with missing cells: ``A = S K S^T + D`` projected from the grid's eigenbasis.

``S`` ``(n, N)`` selects the observed cells ``c`` of a grid (a selection lift, :data:`Lift.kind`), ``K`` is
a Kronecker product ``Q Lambda Q^T`` (per-factor eigendecompositions, :mod:`.kronecker_spectrum`) and ``D``
the observed rows' positive diagonal noise ``d`` ``(n,)``. With the top ``r`` eigenpairs ``(Q_I, Lambda_I)``
of ``K`` (the fewest whose left-out trace ``tau`` is at most ``tol * min(d)``):

    P = F F^T + D,      F = S Q_I Lambda_I^{1/2}      (n x r, never formed)
    A - P = S (K - Q_I Lambda_I Q_I^T) S^T  is PSD with trace <= tau,

so ``P^{-1} A`` has eigenvalues in ``[1, 1 + tol]`` and ``0 <= log det A - log det P <= tol`` (PCG needs a
few iterations, SLQ estimates a correction of at most ``tol`` nats). ``P`` is applied as a low-rank-plus-
diagonal (:class:`.preconditioners.LowRankDiagonal`'s formulas) with ``V = D^{-1/2} F`` and the ``r x r``
Gram ``V^T V = W diag(s) W^T``:

    V^T V = Lambda_I^{1/2} [Q^T diag(w) Q]_{I, I} Lambda_I^{1/2},     w = S^T d^{-1}  (0 on missing cells)

The Gram is one contraction per factor over the grid (no ``n x r`` matrix): with ``J_i`` the eigenvector
columns of factor ``i`` that ``I`` uses (``t_i`` of them),

    T <- sum_{x_i} Q_i[x_i, a] Q_i[x_i, b] T[..., x_i, ...]      for i = 1..d, T starting as w on the grid,

which leaves ``T[a_1 b_1, ..., a_d b_d]`` (``prod t_i^2`` entries; ``N t_1^2 + ...`` flops), and
``[Q^T diag(w) Q]_{ab} = T[a_1 b_1, ..., a_d b_d]``. Products with ``V`` and ``V^T`` are a scatter or gather
of the observed cells and a truncated transform by the factors' ``Q_i[:, J_i]``: per column one selection
each way and about one Kronecker product's flops. Set-up ``N t_1^2 + prod(t_i^2) n_d + r^3`` flops, memory
``prod(t_i^2) + r^2`` (float64). Unbatched operators only (the chooser falls back to the other preconditioners).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.sum import AddedDiagonal
from structgp.inference.kronecker_spectrum import kronecker_spectra
from structgp.inference.preconditioners import Preconditioner

# left-out trace of the base as a fraction of the smallest noise: P^{-1} A has eigenvalues in [1, 1 + TAIL_TOL]
TAIL_TOL = 1e-2
MAX_RANK = 4096  # r^3 / 3 set-up flops and r^2 memory; beyond it the deflation stops (PCG takes more steps)
MAX_GRAM_ENTRIES = 2**26  # prod(t_i^2) of the Gram contraction (512 MiB in float64)


def is_masked_grid(op: Operator) -> bool:
    """Whether ``op`` is ``S K S^T + diagonal noise``: a selection lift of an unbatched, non-diagonal
    Kronecker product (metadata only)."""
    if not isinstance(op, AddedDiagonal) or not isinstance(op.base, SparseLifted):
        return False
    lifted = op.base
    base = lifted.base
    return (
        lifted.lift.kind == "selection"
        and isinstance(base, Kronecker)
        and not base.is_diagonal
        and isinstance(op.noise, (Diagonal, ScaledIdentity))
        and op.batch_shape == torch.Size()
    )


class MaskedKroneckerDeflation(Preconditioner):
    """``P = F F^T + D`` for ``S K S^T + D`` (see the module). ``cells`` ``(n,)``: the grid cell of each row;
    ``noise`` ``(n,)``; ``values``/``vectors``: the factor spectra (float64, eigenvalues ascending)."""

    name = "masked kronecker deflation"

    def __init__(self, cells: Tensor, noise: Tensor, values: list[Tensor], vectors: list[Tensor], tol: float) -> None:
        dtype = noise.dtype
        self.cells = cells
        self.sizes = [q.shape[-1] for q in vectors]
        self.n_cells = int(torch.tensor(self.sizes).prod())
        noise64 = noise.double()
        index, lam = _top_index(values, tol * float(noise64.min()), self.sizes)
        self.rank = index.numel()
        self.sqrt = noise.sqrt()
        self.inv_sqrt = noise.rsqrt()
        self._noise_logdet = noise64.log().sum()
        if self.rank == 0:
            self._s_logdet = noise64.new_zeros(())
            return
        digits, self.columns = _digits(index, self.sizes)
        # per factor: the eigenvector columns used (n_i, t_i); the box position of each chosen pair
        self.bases = [q[:, cols] for q, cols in zip(vectors, self.columns)]
        widths = [c.numel() for c in self.columns]
        self.box_shape = widths
        self.box_size = int(torch.tensor(widths).prod())
        self.box_index = _flat(digits, widths)  # (r,) position in the (t_1, ..., t_d) box
        weights = noise64.new_zeros(self.n_cells).index_put_((cells,), 1 / noise64)
        gram = _masked_gram(weights, self.bases, digits, widths)  # [Q^T diag(w) Q]_{I, I}
        root = lam.sqrt()
        s, w = torch.linalg.eigh(root[:, None] * gram * root[None, :])
        s = s.clamp_min(0)
        self._s_logdet = s.log1p().sum()
        self.lam_root = root.to(dtype)
        self.w = w.to(dtype)
        self.c_inv = (1 / (1 + s)).to(dtype)
        self.c_root = (1 / ((1 + s).sqrt() + 1)).to(dtype)
        self.bases = [b.to(dtype) for b in self.bases]

    # V^T y and V z, through the grid -----------------------------------------------------------------
    def _vt(self, y: Tensor) -> Tensor:
        """``V^T y = Lambda_I^{1/2} Q_I^T S^T D^{-1/2} y`` ``(r, c)`` for ``y`` ``(n, c)``."""
        c = y.shape[-1]
        grid = y.new_zeros(self.n_cells, c).index_copy_(0, self.cells, self.inv_sqrt[:, None] * y)
        box = _transform(grid.view(*self.sizes, c), [b.mT for b in self.bases])
        return self.lam_root[:, None] * box.reshape(-1, c)[self.box_index]

    def _v(self, z: Tensor) -> Tensor:
        """``V z = D^{-1/2} S Q_I Lambda_I^{1/2} z`` ``(n, c)`` for ``z`` ``(r, c)``."""
        c = z.shape[-1]
        box = z.new_zeros(self.box_size, c)
        box = box.index_copy_(0, self.box_index, self.lam_root[:, None] * z)
        grid = _transform(box.view(*self.box_shape, c), self.bases).reshape(-1, c)
        return self.inv_sqrt[:, None] * grid[self.cells]

    def _low_rank(self, weights: Tensor, x: Tensor) -> Tensor:
        """``V W diag(weights) W^T V^T x``."""
        return self._v(self.w @ (weights[:, None] * (self.w.mT @ self._vt(x))))

    # the preconditioner protocol (unbatched: x is (n, c)) -----------------------------------------------
    def solve(self, r: Tensor) -> Tensor:
        white = self.inv_sqrt[:, None] * r
        if self.rank:
            white = white - self._low_rank(self.c_inv, white)
        return self.inv_sqrt[:, None] * white

    def logdet(self) -> Tensor:
        return (self._noise_logdet + self._s_logdet).to(self.sqrt.dtype)

    def root_matmul(self, eps: Tensor) -> Tensor:
        out = eps + self._low_rank(self.c_root, eps) if self.rank else eps
        return self.sqrt[:, None] * out

    def describe(self) -> str:
        return f"{self.name} (rank {self.rank})"


def masked_preconditioner(op: AddedDiagonal, tol: float = TAIL_TOL) -> MaskedKroneckerDeflation:
    """The preconditioner for a masked grid (:func:`is_masked_grid`); run without autograd."""
    lifted: SparseLifted = op.base
    spectra = kronecker_spectra(lifted.base)
    noise = op.noise.diagonal().expand(op.n)
    return MaskedKroneckerDeflation(lifted.lift.col, noise, spectra.values, spectra.vectors, tol)


# -- helpers ------------------------------------------------------------------------------------------


def _top_index(values: list[Tensor], budget: float, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Positions ``(r,)`` (in the product's row order) of the fewest largest product eigenvalues whose
    left-out sum is at most ``budget``, at most ``MAX_RANK`` and within ``MAX_GRAM_ENTRIES``; and those
    eigenvalues ``(r,)`` (float64)."""
    lam = values[0].double()
    for v in values[1:]:
        lam = (lam[:, None] * v.double()[None, :]).reshape(-1)
    order = lam.argsort(descending=True)
    ordered = lam[order].clamp_min(0)
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[k]: sum of eigenvalues k, k+1, ... (left out if r = k)
    r = int((tail > budget).sum())
    r = min(r, MAX_RANK)
    while r > 0 and _box_entries(order[:r], sizes) > MAX_GRAM_ENTRIES:
        r = r * 3 // 4
    index = order[:r]
    return index, ordered[:r]


def _digits(index: Tensor, sizes: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Per factor: each chosen position's box digit ``(r,)`` and the factor's columns used ``(t_i,)``."""
    digits, columns, rest = [], [], index
    per_factor = []
    for n_i in reversed(sizes):  # the last factor varies fastest
        per_factor.append(rest % n_i)
        rest = rest // n_i
    for idx in reversed(per_factor):
        cols, digit = torch.unique(idx, return_inverse=True)
        columns.append(cols)
        digits.append(digit)
    return digits, columns


def _box_entries(index: Tensor, sizes: list[int]) -> int:
    """``prod t_i^2`` for the chosen positions ``index``."""
    _, columns = _digits(index, sizes)
    total = 1
    for c in columns:
        total *= c.numel() ** 2
    return total


def _flat(digits: list[Tensor], widths: list[int]) -> Tensor:
    """Row-major position of the digits in a box of ``widths``."""
    out = torch.zeros_like(digits[0])
    for d, w in zip(digits, widths):
        out = out * w + d
    return out


def _transform(x: Tensor, mats: list[Tensor]) -> Tensor:
    """``x`` ``(m_1, ..., m_d, c)`` times ``mats[i]`` ``(k_i, m_i)`` along axis ``i`` -> ``(k_1, ..., k_d, c)``."""
    for axis, m in enumerate(mats):
        x = torch.tensordot(m, x, dims=([1], [axis])).movedim(0, axis)
    return x


def _masked_gram(weights: Tensor, bases: list[Tensor], digits: list[Tensor], widths: list[int]) -> Tensor:
    """``[Q^T diag(w) Q]_{I, I}`` ``(r, r)`` by one contraction per factor (see the module)."""
    t = weights.view(1, -1)  # (pairs so far, rest of the grid)
    for q in bases:
        n_i, t_i = q.shape
        pairs = (q[:, :, None] * q[:, None, :]).reshape(n_i, t_i * t_i)  # (n_i, t_i^2)
        t = t.view(t.shape[0], n_i, -1)
        t = torch.einsum("pxr,xq->pqr", t, pairs).reshape(t.shape[0] * t_i * t_i, -1)
    t = t.reshape(-1)
    pos = torch.zeros(digits[0].numel(), digits[0].numel(), dtype=torch.int64, device=weights.device)
    for d, w in zip(digits, widths):
        pos = pos * (w * w) + (d[:, None] * w + d[None, :])
    return t[pos]
