"""Preconditioners of the iterative engine: ``P = R R^T ~= A`` with ``P^{-1}``, ``log det P`` and ``R`` cheap.

Each one applies ``P^{-1}`` (for PCG), knows ``log det P`` exactly (the control variate of SLQ, see
:mod:`.slq`) and multiplies by a square root ``R`` (the probes are ``z = R eps``, Rademacher ``eps``).
``R`` is the symmetric root where that is cheap: then ``R^{-1} A R^{-T}`` is near-diagonal wherever ``P``
is, and Rademacher probes are exact on the diagonal. All set-up runs without autograd: the gradients of
the iterative engine are unbiased for any ``P`` (:mod:`.iterative`). The low-rank and Kronecker ones also
carry a ``family``, ``P`` as a differentiable function of the operator with their pivots / eigenvectors
fixed, whose exact log-det derivative is the control variate of the engine's gradient
(:mod:`.control_variate`; used per batch member where the low-rank part leaves out at most
``CV_MAX_REMAINDER`` times the noise on the diagonal).

- :class:`Identity`: ``P = I``.
- :class:`Jacobi`: ``P = diag(A)``.
- :class:`LowRankDiagonal`: ``P = L L^T + diag(d)``, from a partial pivoted Cholesky factor ``L`` (with
  ``d`` the operator's noise, or the remainder's diagonal where there is no noise term) or from the top
  eigenpairs of a Kronecker product (with ``d`` the noise).
  With ``V = d^{-1/2} L`` and the eigendecomposition ``V^T V = W diag(s) W^T`` (``k x k``, formed in the
  data's precision, decomposed in float64 by :mod:`.gram_spectrum`),

      P^{-1} = d^{-1/2} (I - V W diag(1 / (1 + s)) W^T V^T) d^{-1/2},
      R = d^{1/2} (I + V W diag(1 / (sqrt(1 + s) + 1)) W^T V^T) = d^{1/2} (I + V V^T)^{1/2},
      log det P = sum log d + sum log(1 + s);

  ``n k^2 + O(k^3)`` flops to set up (``V^T V``; ``V W`` is never formed), ``4 n k + 4 k^2`` a column to
  apply; ``1 + s >= 1``, so no jitter is ever needed.
- :class:`KroneckerEigenPreconditioner`: ``P = K + s I = Q (Lambda + s) Q^T`` for a Kronecker
  ``K = Q Lambda Q^T`` from the eigendecompositions of its factors (``sum n_i^3``, shared with the eigen
  engine through :mod:`.kronecker_spectrum`), applied by factor-wise products; ``s`` is the mean of a
  heteroskedastic noise. ``R = Q (Lambda + s)^{1/2} Q^T``.
- :func:`lifted_eigen_preconditioner`: for ``L B L^T + D`` (:class:`~structgp.covariance.SparseLifted` plus
  diagonal noise) with a latent grid too large for the exact latent Woodbury, the top-``k`` eigenpairs of
  the latent base ``B ~= U Lambda U^T`` (:func:`.eigsh`, exact by structure for Kronecker ``B``) give the
  tall factor ``F = L U Lambda^{1/2}`` (``n_out x k``, by sparse products) and ``P = F F^T + D``, applied as
  :class:`LowRankDiagonal` (``k x k`` float64 capacitance, determinant lemma, symmetric root).

:func:`build` picks one per structure (``settings(preconditioner="auto")``): Kronecker + diagonal noise
gets the *deflated* Kronecker preconditioner ``Q_r Lambda_r Q_r^T + D`` (the top ``r`` eigenpairs of ``K``,
the fewest that leave out a trace of at most ``REMAINDER_TOL * min(d)``; exact noise) when ``r`` is
affordable, else ``(K + mean(d) I)``; a grid with missing cells (a selection lift of a Kronecker product plus
diagonal noise) gets the projected Kronecker deflation of :mod:`.masked_kronecker_preconditioner`; any other
SparseLifted + diagonal noise gets the latent eigen preconditioner;
every other operator gets a pivoted Cholesky of rank up to
``precond_rank`` (rank 0: Jacobi).

Partitioned by rows across processes (``part``, :mod:`.partitioned`): Jacobi, the pivoted Cholesky
preconditioner and ``"none"`` keep this rank's rows of their vectors and factor; their sums over rows
(``log det``, the ``k x k`` Gram ``V^T V`` and the ``V^T r`` of each application) are summed over the ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp._config import Settings
from structgp.covariance.diagonal import ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.lift_products import rows_and_values
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import Lift, SparseLifted, lifted_diagonal
from structgp.covariance.sum import AddedDiagonal
from structgp.covariance.validation import host_readable
from structgp.distributed.rows import Rows
from structgp.inference.control_variate import (
    Family,
    KroneckerShiftFamily,
    NystromFamily,
    SubspaceNystromFamily,
    kronecker_products,
)
from structgp.inference.eigsh import eigsh
from structgp.inference.gram_spectrum import gram_spectrum
from structgp.inference.kronecker_spectrum import eigenvector_columns, kronecker_spectra, spectral_matmul
from structgp.inference.pivoted_cholesky import pivoted_cholesky_pivots

# Low-rank parts grow until the trace of what they leave out is at most REMAINDER_TOL x the smallest noise
# variance: then P^{-1} A has eigenvalues in [1, 1 + REMAINDER_TOL] (few CG iterations, tiny SLQ variance).
REMAINDER_TOL = 0.1
MAX_DEFLATION_RANK = 4096
# A low-rank preconditioner's family serves as control variate (:mod:`.control_variate`) where the largest
# diagonal entry of what its low-rank part leaves out is at most this times the smallest noise variance:
# a fixed-coefficient control variate can add variance where P misses much of A (measured: it shrinks the
# gradient's spread at a ratio of 0.4 to 1.7 and grows it at 8)
CV_MAX_REMAINDER = 1.0
# relative residual of the latent eigenpairs where they come from Lanczos (bases without an exact rule): any
# F keeps P = F F^T + D positive definite, so loose eigenpairs only cost iterations, never correctness
LATENT_EIGSH_TOL = 1e-3


class Preconditioner:
    """``P = R R^T``: ``solve`` (..., n, c) -> P^{-1} r, ``logdet() -> (...)``, ``root_matmul``: ``R eps``.

    ``family``: ``P`` as a differentiable function of the operator with this preconditioner's discrete
    choices fixed (:mod:`.control_variate`), or None where there is none (then the engine's gradient of
    ``log det`` is the plain Hutchinson estimate)."""

    name = ""
    family: Family | None = None

    def solve(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def logdet(self) -> Tensor:
        raise NotImplementedError

    def root_matmul(self, eps: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Identity(Preconditioner):
    name = "none"

    def __init__(self, like: Tensor, batch_shape: torch.Size) -> None:
        self._zero = like.new_zeros(batch_shape)

    def solve(self, r: Tensor) -> Tensor:
        return r

    def logdet(self) -> Tensor:
        return self._zero

    def root_matmul(self, eps: Tensor) -> Tensor:
        return eps


class Jacobi(Preconditioner):
    """``P = diag(d)`` for a positive ``d`` ``(..., n)`` (partitioned: this rank's rows of ``d``)."""

    name = "jacobi"

    def __init__(self, d: Tensor, part: Rows | None = None) -> None:
        self.d, self.part = d, part

    def solve(self, r: Tensor) -> Tensor:
        return r / self.d.unsqueeze(-1)

    def logdet(self) -> Tensor:
        total = self.d.log().sum(-1)
        return total if self.part is None else self.part.sum(total, "log det P")

    def root_matmul(self, eps: Tensor) -> Tensor:
        return self.d.sqrt().unsqueeze(-1) * eps


class LowRankDiagonal(Preconditioner):
    """``P = L L^T + diag(d)`` for ``L`` ``(..., n, k)`` and a positive ``d`` ``(..., n)`` (see above;
    partitioned: this rank's rows of ``L`` and ``d``)."""

    name = "low rank + diagonal"

    def __init__(self, factor: Tensor, d: Tensor, name: str, part: Rows | None = None) -> None:
        self.name = name
        self.rank = factor.shape[-1]
        inv_sqrt = d.rsqrt()
        # V^T V in the data's precision (its n k^2 flops are the set-up cost), decomposed in float64
        reduce = None if part is None else (lambda t: part.sum(t, "V^T V, V^T r"))
        gram = gram_spectrum(inv_sqrt.unsqueeze(-1) * factor.to(d.dtype), product_in_float64=False, reduce=reduce)
        s = gram.values
        self.inv_sqrt = inv_sqrt
        self.sqrt = d.sqrt()
        # V and W are applied one after the other (4 k^2 flops a column) rather than B = V W formed once
        # (n k^2 flops, as much as V^T V): set-up dominates the few PCG steps these preconditioners need
        self.gram = gram.to(d.dtype)
        self.c_inv = (1 / (1 + s)).to(d.dtype)
        self.c_root = (1 / ((1 + s).sqrt() + 1)).to(d.dtype)
        log_d = d.log().sum(-1) if part is None else part.sum(d.log().sum(-1), "log det P")
        self._logdet = log_d + s.log1p().sum(-1).to(d.dtype)

    def solve(self, r: Tensor) -> Tensor:
        white = self.inv_sqrt.unsqueeze(-1) * r
        return self.inv_sqrt.unsqueeze(-1) * (white - self.gram.spectral_matmul(self.c_inv, white))

    def logdet(self) -> Tensor:
        return self._logdet

    def root_matmul(self, eps: Tensor) -> Tensor:
        return self.sqrt.unsqueeze(-1) * (eps + self.gram.spectral_matmul(self.c_root, eps))

    def describe(self) -> str:
        return f"{self.name} (rank {self.rank})"


class KroneckerEigenPreconditioner(Preconditioner):
    """``P = Q (Lambda + s) Q^T``: ``Q = Q_1 (x) Q_2 (x) ...`` (``(..., n_i, n_i)``), eigenvalues ``lam``
    ``(..., N)``, shift ``s`` ``(...)``."""

    name = "kronecker eigen"

    def __init__(self, vectors: list[Tensor], lam: Tensor, shift: Tensor) -> None:
        self.vectors = vectors
        self.spectrum = lam + shift.unsqueeze(-1)

    def solve(self, r: Tensor) -> Tensor:
        return spectral_matmul(self.vectors, self.spectrum.reciprocal(), r)

    def logdet(self) -> Tensor:
        return self.spectrum.log().sum(-1)

    def root_matmul(self, eps: Tensor) -> Tensor:
        return spectral_matmul(self.vectors, self.spectrum.sqrt(), eps)


# -- choice per structure -----------------------------------------------------------------------------


def _with_family(precond: Preconditioner, family: Family, use: Tensor | None = None) -> Preconditioner:
    family.use = use
    precond.family = family
    return precond


def _close_enough(remainder: Tensor, noise: Tensor, part: Rows | None = None) -> Tensor:
    """Per batch member ``(...)``: whether the low-rank part leaves little enough for the control variate."""
    largest, smallest = remainder.amax(-1), noise.amin(-1)
    if part is not None:
        largest, smallest = part.amax(largest, "the remainder"), part.amin(smallest, "the noise")
    return largest <= CV_MAX_REMAINDER * smallest


def kronecker_preconditioner(op: AddedDiagonal, cfg: Settings, mode: str) -> Preconditioner:
    """For ``Kronecker + diagonal noise``: ``mode`` ``"deflated"``, ``"eigen"`` or ``"auto"``."""
    spectra_64 = kronecker_spectra(op.base)
    spectra = spectra_64.to(op.dtype)
    vectors = spectra.vectors
    lam = spectra.eigenvalues().expand(*op.batch_shape, op.n)
    noise = op.noise.diagonal().expand(*op.batch_shape, op.n)
    if isinstance(op.noise, ScaledIdentity):  # P = A exactly
        return _kronecker_eigen(spectra_64, lam, op.noise.scale.expand(op.batch_shape))
    if mode != "eigen":
        budget = REMAINDER_TOL * noise.amin(-1, keepdim=True)
        tail = lam.sort(dim=-1).values.cumsum(-1)  # tail[i]: sum of the i + 1 smallest eigenvalues
        rank = int((op.n - (tail <= budget).sum(-1)).max())
        # n r^2 to set up: beyond r = n / 2 it would cost about what a dense Cholesky (n^3 / 3) does
        cap = min(MAX_DEFLATION_RANK, op.n // 2, cfg.memory_budget // (8 * op.n * op.dtype.itemsize))
        if mode == "deflated" or rank <= cap:
            rank = min(rank, op.n)
            if rank == 0:
                return Jacobi(noise)
            top, index = lam.topk(rank, dim=-1)
            factor = eigenvector_columns(vectors, index, top.sqrt())
            precond = LowRankDiagonal(factor, noise, "deflated kronecker eigen + noise")
            return _with_family(precond, _deflated_family(spectra_64.vectors, index, top, precond))
    return _kronecker_eigen(spectra_64, lam, noise.mean(-1))


def _kronecker_eigen(spectra_64, lam: Tensor, shift: Tensor) -> Preconditioner:
    precond = KroneckerEigenPreconditioner([q.to(lam.dtype) for q in spectra_64.vectors], lam, shift)
    return _with_family(precond, KroneckerShiftFamily(spectra_64.vectors, precond.spectrum))


def _deflated_family(
    vectors: list[Tensor], index: Tensor, top: Tensor, precond: LowRankDiagonal
) -> SubspaceNystromFamily:
    """The top ``r`` Kronecker eigenvectors ``Q_r`` fixed: ``K Q_r (Q_r^T K Q_r)^{-1} Q_r^T K + D``."""
    products = kronecker_products(_base, vectors, index)
    return SubspaceNystromFamily(eigenvector_columns(vectors, index), top, precond, _base, _no_lift, products)


def _base(op: Operator) -> Operator:
    return op.base


def _no_lift(op: Operator) -> None:
    return None


def pivoted_cholesky_preconditioner(op: Operator, rank: int, part: Rows | None = None) -> Preconditioner:
    """Pivoted Cholesky ``L`` of rank at most ``rank``. For ``base + noise``: ``L`` of the base, grown until
    the remainder's trace is at most ``REMAINDER_TOL * min(noise)``, and ``P = L L^T + noise`` (measured:
    half the iterations of also adding the remainder's diagonal). Else ``P = L L^T + diag(remainder)``.
    ``part``: this rank's rows (the diagonal and noise are whole on every rank: ``O(n)``)."""
    noisy = isinstance(op, AddedDiagonal)
    if noisy:
        noise = op.noise.diagonal().expand(*op.batch_shape, op.n)
        piv = pivoted_cholesky_pivots(op.base, rank, stop=REMAINDER_TOL * noise.amin(-1), part=part)
        noise = noise if part is None else part.local(noise, -1)
        rest = noise
    else:
        piv = pivoted_cholesky_pivots(op, rank, part=part)
        rest = piv.remainder.to(op.dtype)
    floor = math.sqrt(torch.finfo(rest.dtype).eps) * op.diagonal().mean(-1, keepdim=True).abs()
    rest = torch.maximum(rest, floor)
    if piv.factor.shape[-1] == 0:
        return Jacobi(rest, part)
    precond = LowRankDiagonal(piv.factor, rest, "pivoted cholesky", part)
    use = _close_enough(piv.remainder, noise.double(), part) if noisy else None
    return _with_family(precond, NystromFamily(piv.pivots, piv.active, noisy, floor, part, precond), use)


def lifted_eigen_preconditioner(op: AddedDiagonal, cfg: Settings, part: Rows | None = None) -> Preconditioner:
    """For ``L B L^T + D``: ``P = F F^T + D``, ``F = L U Lambda^{1/2}`` ``(..., n_out, k)`` from the top
    ``k = precond_rank`` eigenpairs of ``B`` (fewer where ``F`` would pass the memory budget, or ``B`` is
    smaller); rank 0 gives Jacobi on the diagonal of ``A``. ``part``: this rank's rows of ``F`` and ``D``
    (each rank applies its rows of ``L``; ``B``'s eigenpairs are computed on every rank, the same)."""
    lifted: SparseLifted = op.base
    noise = op.noise.diagonal().expand(*op.batch_shape, op.n)
    rows = op.n if part is None else part.size
    cap = cfg.memory_budget // (8 * rows * op.dtype.itemsize)
    rank = min(cfg.precond_rank, lifted.n_in, cap)
    if part is not None:  # every rank takes the same rank (the smallest cap), or their recursions would differ
        rank = int(part.amin(torch.tensor(rank, device=op.device), "the preconditioner's rank"))
    if rank == 0:
        diag = op.diagonal().expand(*op.batch_shape, op.n)
        return Jacobi(diag if part is None else part.local(diag, -1), part)
    lam, u = eigsh(lifted.base, rank, tol=LATENT_EIGSH_TOL)
    # tiny negative eigenvalues of a PSD base (rounding) contribute nothing rather than NaN
    lam = lam.clamp_min(0)
    lift, values = rows_and_values(lifted.lift, part)  # this rank's rows of L when partitioned
    noise = noise if part is None else part.local(noise, -1)
    factor = lift.matmul(u * lam.sqrt().unsqueeze(-2), values)  # sparse L times (n_in, k)
    precond = LowRankDiagonal(factor, noise, "lifted latent eigen + noise", part)
    remainder = lifted_diagonal(lift, lifted.base, values).expand_as(noise) - factor.square().sum(-1)
    products = _kronecker_products(lifted.base, u)
    family = SubspaceNystromFamily(u, lam, precond, _latent_base, _lift, products, part)
    return _with_family(precond, family, _close_enough(remainder, noise, part))


def _kronecker_products(base: Operator, u: Tensor):
    """``K U`` by structure for a Kronecker latent base whose eigenvectors ``u`` ``(..., n_in, k)`` are its
    top product eigenvectors (what :func:`eigsh` returns for it: checked here), else None (products)."""
    if not isinstance(base, Kronecker) or base.is_diagonal or not host_readable(u):
        return None
    spectra = kronecker_spectra(base, psd=False)
    index = spectra.eigenvalues().topk(u.shape[-1], dim=-1).indices
    same = eigenvector_columns(spectra.vectors, index).to(u.dtype)
    if same.shape != u.shape:
        return None
    # eigsh's Kronecker rule computes exactly these columns (bitwise: one pass, no temporaries); a tolerance
    # only where they differ (allclose's temporaries cost 20x the pass at seed 002's 125 000 x 256)
    if not torch.equal(same, u) and not torch.allclose(same, u, rtol=0, atol=100 * torch.finfo(u.dtype).eps):
        return None
    return kronecker_products(_latent_base, spectra.vectors, index)


def _latent_base(op: Operator) -> Operator:
    return op.base.base


def _lift(op: Operator) -> Lift:
    return op.base.lift


def is_lifted_sum(op: Operator) -> bool:
    """Whether ``op`` is ``L B L^T + D``: a :class:`SparseLifted` plus noise."""
    return isinstance(op, AddedDiagonal) and isinstance(op.base, SparseLifted)


def _is_kronecker_sum(op: Operator) -> bool:
    return isinstance(op, AddedDiagonal) and isinstance(op.base, Kronecker) and not op.base.is_diagonal


# (n, k) arrays held at once by the preconditioner with its gradient's control variate (measured, peak live
# tensors of one value + gradient): pivoted Cholesky 3 (its factor; the first-order control variate's B and
# G_C), the lifted eigen preconditioner 5 (F; SubspaceNystromFamily's four)
PIVOTED_ARRAYS, LIFTED_ARRAYS = 3, 5


def planned_kind(op: Operator, cfg: Settings) -> str:
    """The preconditioner :func:`build` gives ``op`` in one process under ``cfg`` (metadata only): the setting
    itself, or what ``"auto"`` resolves to: ``"kronecker"`` (Kronecker + diagonal), ``"masked_grid"`` (a grid
    with missing cells), ``"lifted_eigen"`` (``L B L^T + D``) or ``"pivoted_cholesky"``."""
    if cfg.preconditioner != "auto":
        return cfg.preconditioner
    if _is_kronecker_sum(op):
        return "kronecker"
    # a grid with missing cells (its module imports this one: imported here)
    from structgp.inference.masked_kronecker_preconditioner import is_masked_grid

    if is_masked_grid(op):
        return "masked_grid"
    return "lifted_eigen" if is_lifted_sum(op) else "pivoted_cholesky"


def factor_arrays(op: Operator, cfg: Settings) -> tuple[int, int]:
    """``(arrays, k)``: how many ``(n, k)`` arrays the preconditioner :func:`build` gives ``op`` under ``cfg``
    holds at once with its control variate, for the iterative engine's memory estimate (no numerical work).
    Without the control variate only the factor; Jacobi and none hold no ``(n, k)`` array; the Kronecker and
    masked-grid preconditioners are counted as two (not measured)."""
    kind, control_variate = planned_kind(op, cfg), cfg.logdet_control_variate
    if kind in ("none", "jacobi"):
        return 0, 0
    if kind == "lifted_eigen" and is_lifted_sum(op):
        return (LIFTED_ARRAYS if control_variate else 1), min(cfg.precond_rank, op.base.n_in, op.n)
    if kind == "pivoted_cholesky" and not _is_kronecker_sum(op):
        return (PIVOTED_ARRAYS if control_variate else 1), min(cfg.precond_rank, op.n)
    return 2, min(cfg.precond_rank, op.n)


def build(op: Operator, cfg: Settings, part: Rows | None = None) -> Preconditioner:
    """The preconditioner for ``op`` under ``cfg.preconditioner`` (runs without autograd); ``part``: this
    rank's rows of a partitioned run (``"none"``, ``"jacobi"``, pivoted Cholesky and, for ``L B L^T + D``, the
    lifted eigen preconditioner take it)."""
    kind = cfg.preconditioner
    with torch.no_grad():
        if kind == "none":
            return Identity(op.diagonal(), op.batch_shape)
        if kind == "jacobi":
            diag = op.diagonal().expand(*op.batch_shape, op.n)
            return Jacobi(diag if part is None else part.local(diag, -1), part)
        if part is not None and is_lifted_sum(op) and kind in ("auto", "lifted_eigen"):
            return lifted_eigen_preconditioner(op, cfg, part)
        if part is not None and kind not in ("auto", "pivoted_cholesky"):
            raise ValueError(f"preconditioner={kind!r} does not apply to {op!r}; use 'auto' or 'pivoted_cholesky'")
        if part is not None:
            return pivoted_cholesky_preconditioner(op, cfg.precond_rank, part)
        if kind in ("kronecker_eigen", "kronecker_deflated"):
            if not _is_kronecker_sum(op):
                raise ValueError(
                    f"preconditioner={kind!r} needs a Kronecker + diagonal operator, got {op!r}; "
                    "use 'auto', 'pivoted_cholesky', 'jacobi' or 'none'"
                )
            return kronecker_preconditioner(op, cfg, "eigen" if kind == "kronecker_eigen" else "deflated")
        if kind == "lifted_eigen":
            if not is_lifted_sum(op):
                raise ValueError(
                    f"preconditioner='lifted_eigen' needs a SparseLifted + diagonal operator, got {op!r}; "
                    "use 'auto', 'pivoted_cholesky', 'jacobi' or 'none'"
                )
            return lifted_eigen_preconditioner(op, cfg)
        kind = planned_kind(op, cfg)  # "auto" resolved
        if kind == "kronecker":
            return kronecker_preconditioner(op, cfg, "auto")
        if kind == "masked_grid":
            from structgp.inference.masked_kronecker_preconditioner import masked_preconditioner

            return masked_preconditioner(op)
        if kind == "lifted_eigen":
            return lifted_eigen_preconditioner(op, cfg)
        return pivoted_cholesky_preconditioner(op, cfg.precond_rank)
