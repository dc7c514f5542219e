"""The preconditioner as a control variate of the Hutchinson gradient of ``log det A``.

With probes ``z = R eps`` (``E[z z^T] = P``), ``u = A^{-1} z`` and ``v = P^{-1} z``,

    tr(A^{-1} dA) = tr(P^{-1} dP) + E[u^T dA v - v^T dP v]

with ``P`` the preconditioner PCG ran with and any symmetric ``dP`` linear in ``d theta``
(``E[v^T X v] = tr(P^{-1} X P^{-1} P)`` for every ``X``): the estimate is unbiased whatever ``dP`` is, and
its variance is small wherever ``P ~ A`` and ``dP ~ dA`` (it is 0 for ``P = A``). The first term must be
exact and cheap; the derivative of a ``P(theta)`` that equals the built preconditioner at the current
``theta`` gives both. A *family* here keeps a built preconditioner's discrete choices (pivots, eigenbases,
ranks) and gives ``P(theta)`` for the operator with autograd:

- :class:`NystromFamily`: the pivoted Cholesky preconditioner with its pivots ``S`` fixed,
  ``P = C W^{-1} C^T + D`` with ``C = A[:, S]`` (through :func:`.pivoted_cholesky.column`),
  ``W = A[S, S]``, ``D`` the noise (or what the low-rank part leaves of ``diag(A)``); ``log det P`` by the
  determinant lemma, ``k x k`` Choleskys in float64. For kernel matrices (unbatched, outside functorch
  transforms) the control variate is its first-order form instead: fixed weights ``2 Q B``, ``-B^T Q B``,
  ``diag(Q)`` (``Q = P^{-1} - mean_i v_i v_i^T``, ``B = C W^{-1}``) against ``C``, ``W`` and ``D`` under
  autograd, ``C`` summed one row block at a time: the same gradient, with no ``n x k`` tensor kept for the
  backward (measured, N = 20 000, rank 256: the call's peak memory from 351 to 223 MiB).
- :class:`SubspaceNystromFamily`: for the eigen preconditioners (deflated Kronecker, lifted latent eigen),
  ``P = C W^{-1} C^T + D`` with ``C = L K U``, ``W = U^T K U`` over the fixed eigenvectors ``U`` of the base
  ``K``, in a first-order form at the current ``theta`` (``k`` products with the base under autograd).
- :class:`KroneckerShiftFamily`: ``P = K + s I`` (``s`` the mean noise) for the Kronecker eigen
  preconditioner: ``log det P = sum log(lambda + s)`` with the eigenvalues moved by the factors' Rayleigh
  quotients (no ``eigh`` backward, so repeated eigenvalues are harmless) and ``v^T P v`` from ``A v``.

Each family's ``control_variate(op, v, a_v)`` has the gradient of ``log det P(theta) - mean_i v_i^T
P(theta) v_i`` at the current ``theta`` (``a_v = A v``, the engine's differentiable product). Everything is
plain torch operations (``torch.func`` and ``vmap`` compose with them). Diagonal preconditioners (Jacobi)
need none: with Rademacher probes ``v^T dP v = sum_i dP_ii eps_i^2 / P_ii = tr(P^{-1} dP)`` exactly, so the
two terms would cancel. A fixed-coefficient control variate can add variance where ``P`` misses much of
``A``: the builders gate the low-rank families (:mod:`.preconditioners`). Cost: ``O(n k^2)`` flops for
rank-``k`` families (about what building the preconditioner costs) plus ``k`` columns (Nystrom) or ``k``
products with the base (subspace) under autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from structgp.covariance.indexing import entries
from structgp.covariance.kron import kron_vector
from structgp.covariance.lift_products import rows_and_values
from structgp.covariance.local_rows import partitionable, weighted_columns
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import Lift
from structgp.covariance.validation import host_readable
from structgp.distributed.partition import partition
from structgp.distributed.rows import Rows
from structgp.inference.kronecker_spectrum import eigenvector_columns
from structgp.inference.pivoted_cholesky import column

if TYPE_CHECKING:  # the preconditioners build the families
    from structgp.inference.preconditioners import LowRankDiagonal


class Family:
    """``P(theta)`` for the operator of a built preconditioner (see the module). ``use`` ``(...)`` (bool) says
    for which batch members the engine uses it (None: all); the preconditioner's builder sets it."""

    use: Tensor | None = None

    def control_variate(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        """``log det P(theta) - mean_i v_i^T P(theta) v_i`` ``(...)`` for detached ``v`` ``(..., n, p)``
        (``a_v = A v``), float64; only its gradient at the current ``theta`` is used."""
        raise NotImplementedError

    def noise_direction(self, noise: Tensor) -> Tensor:
        """The diagonal of ``dP`` ``(..., n)`` when every noise variance ``noise`` ``(..., n)`` grows by the
        same factor (``d / d log s``): the noise itself where ``P`` holds it."""
        return noise


def _noise(op: Operator) -> Tensor:
    return op.noise.diagonal().expand(*op.batch_shape, op.n)


def _diagonal(op: Operator) -> Tensor:
    return op.diagonal().expand(*op.batch_shape, op.n)


def _low_rank_logdet(factor: Tensor, d: Tensor) -> Tensor:
    """``log det(F F^T + diag(d))`` ``(...)`` for ``F`` ``(..., n, k)``: determinant lemma, float64."""
    white = factor.double() * d.double().rsqrt().unsqueeze(-1)
    eye = torch.eye(factor.shape[-1], dtype=torch.float64, device=factor.device)
    chol = torch.linalg.cholesky(eye + white.mT @ white)
    return d.double().log().sum(-1) + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _diag_quad(d: Tensor, v: Tensor) -> Tensor:
    return (d.unsqueeze(-1) * v.square()).sum(-2)


def _low_rank_quad(factor: Tensor, d: Tensor, v: Tensor) -> Tensor:
    """``v_i^T (F F^T + diag(d)) v_i`` ``(..., p)``, float64."""
    v64 = v.double()
    return _diag_quad(d, v64) + (factor.mT @ v64).square().sum(-2)


class _TwoTermFamily(Family):
    """A family that evaluates ``log det P(theta)`` (its value, and its gradient at the current ``theta``)
    and ``v^T P(theta) v`` separately."""

    def logdet(self, op: Operator) -> Tensor:
        """``log det P(theta)`` ``(...)``, float64."""
        raise NotImplementedError

    def quad(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        """``v_i^T P(theta) v_i`` ``(..., p)``; ``a_v = A v``."""
        raise NotImplementedError

    def control_variate(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        return self.logdet(op) - self.quad(op, v, a_v).double().mean(-1)


class NystromFamily(_TwoTermFamily):
    """``P = C W^{-1} C^T + D`` over the pivots ``(..., k)`` where ``active`` ``(..., k)`` (inactive ones are
    dropped: zero columns of ``C``, unit rows of ``W``); ``C`` and ``W`` are read from ``op.base`` where
    ``noise`` (then ``D`` is the noise), else from ``op`` (``D = diag(A) - diag(C W^{-1} C^T)``); ``D`` is
    at least ``floor`` ``(..., 1)``, as in the built preconditioner. ``part``: this rank's rows of a
    partitioned run (``v`` and ``a_v`` are this rank's rows; the control variate's gradient is this rank's
    share, :mod:`structgp.distributed.rows`; :meth:`logdet` and :meth:`quad` take one process's operator).

    For an unbatched operator of kernel matrices and diagonals outside functorch transforms (the large
    matrix-free case), :meth:`control_variate` takes the first-order form of :meth:`_first_order` when the
    built preconditioner ``precond`` is given: the same gradient, with no ``n x k`` tensor kept for autograd."""

    def __init__(
        self,
        pivots: Tensor,
        active: Tensor,
        noise: bool,
        floor: Tensor,
        part: Rows | None = None,
        precond: LowRankDiagonal | None = None,
    ) -> None:
        self.pivots, self.active, self.noise, self.floor, self.part = pivots, active, noise, floor, part
        self.precond = precond

    def _parts(self, op: Operator) -> tuple[Tensor, Tensor]:
        """``(F = C L_W^{-T} (..., n, k), D (..., n))``, float64."""
        if self.part is not None:
            raise ValueError("op: a partitioned family gives its control variate only (one process's op here)")
        source = op.base if self.noise else op
        mask = self.active.to(torch.float64)
        # one column per pivot: the pivot index's leading dimension is a batch dimension of ``column``
        cols = column(source, self.pivots.movedim(-1, 0)).movedim(0, -1)  # (..., n, k)
        cols = cols.double() * mask.unsqueeze(-2)
        k = self.pivots.shape[-1]
        index = self.pivots.unsqueeze(-1).expand(*self.pivots.shape, k)
        w = cols.expand(*index.shape[:-2], *cols.shape[-2:]).gather(-2, index)  # A[S, S] (..., k, k)
        w = w * mask.unsqueeze(-1) + torch.diag_embed(1 - mask)
        chol = torch.linalg.cholesky((w + w.mT) / 2)
        factor = torch.linalg.solve_triangular(chol, cols.mT, upper=False).mT
        if self.noise:
            d = _noise(op).double()
        else:
            d = _diagonal(op).double() - factor.square().sum(-1)
        return factor, torch.maximum(d, self.floor.double())

    def logdet(self, op: Operator) -> Tensor:
        return _low_rank_logdet(*self._parts(op))

    def quad(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        return _low_rank_quad(*self._parts(op), v)

    def control_variate(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        source = op.base if self.noise else op
        if self.precond is not None and partitionable(source) and not op.batch_shape and host_readable(v):
            return self._first_order(op, source, v)
        factor, d = self._parts(op)  # once for both terms
        return _low_rank_logdet(factor, d) - _low_rank_quad(factor, d, v).mean(-1)

    def _first_order(self, op: Operator, source: Operator, v: Tensor) -> Tensor:
        """A scalar with the control variate's gradient at the current ``theta`` (its value is not the
        control variate's). With ``Q = P^{-1} - mean_i v_i v_i^T``, ``B = C W^{-1}`` (at ``theta_0``) and
        ``dP = dC B^T + B dC^T - B dW B^T + dD``, the gradient of ``log det P - mean_i v_i^T P v_i`` is that of

            <2 Q B, C> - <B^T Q B, W> + <diag(Q), D>,

        with the weights fixed. Where ``D`` is the remainder ``diag(A) - diag(C W^{-1} C^T)`` (no noise term,
        above its floor), ``<g, dD>`` adds ``<g, diag(dA)> - <2 diag(g) B, dC> + <B^T diag(g) B, dW>``.
        ``P^{-1}`` is the built preconditioner's (equal to ``P(theta_0)``). The weights cost ``O(n k^2)``; the
        weighted sum over ``C`` (:func:`~structgp.covariance.local_rows.weighted_columns`) evaluates ``C`` one
        row block at a time."""
        part, pre = self.part, self.precond
        start, stop = (0, op.n) if part is None else (part.start, part.stop)
        reduce = (lambda t: t) if part is None else (lambda t: part.sum(t, "the control variate's weights"))
        w_theta = entries(source, self.pivots.unsqueeze(-1), self.pivots).double()  # W = A[S, S], differentiable
        with torch.no_grad():
            mask = self.active.to(torch.float64)
            w0 = w_theta * mask.unsqueeze(-1) * mask
            chol_w = torch.linalg.cholesky((w0 + w0.mT) / 2 + torch.diag_embed(1 - mask))
            # B = C W^{-1} = L L_W^{-1}: L = d^{1/2} V is the built factor (C = L L_W^T), L_W = chol(W) in pivot
            # order; no column of A is evaluated here
            factor = (pre.sqrt.unsqueeze(-1) * pre.gram.factor).double()
            if self.noise:  # D = max(noise, floor)
                keep = self._local(_noise(op).double()) > self.floor.double()
            else:  # D = max(diag(A) - rowsum(C * B), floor), rowsum(C * B) = rowsum(L^2)
                keep = self._local(_diagonal(op).double()) - factor.square().sum(-1) > self.floor.double()
            b = torch.linalg.solve_triangular(chol_w.mT, factor.mT, upper=True).mT  # (rows, k)
            del factor
            v64 = v.double()
            g_d = torch.where(keep, _inverse_diagonal(pre) - v64.square().mean(-1), 0.0)  # diag(Q) where D moves
            g_c, g_w = _nystrom_weights(pre, b, v64, g_d, self.noise, reduce)
            g_w = g_w * mask.unsqueeze(-1) * mask
            del b
        out = weighted_columns(source, start, stop, self.pivots, g_c).double()
        if part is None or part.rank == 0:  # W is the same on every rank: counted once
            out = out + (g_w * w_theta).sum()
        d_theta = _noise(op) if self.noise else _diagonal(op)
        return out + (g_d * self._local(d_theta).double()).sum()

    def _local(self, t: Tensor) -> Tensor:
        return t if self.part is None else self.part.local(t, -1)


def _inverse_diagonal(pre: LowRankDiagonal) -> Tensor:
    """``diag(P^{-1})`` ``(..., n)`` of ``P = L L^T + diag(d)``: ``d^{-1} (1 - rowsum((V W)^2 / (1 + s)))``."""
    gram = pre.gram
    z = (gram.factor @ gram.vectors).double().square_()
    return pre.inv_sqrt.double().square() * (1 - (z @ pre.c_inv.double().unsqueeze(-1)).squeeze(-1))


WEIGHT_CHUNK = 32  # columns of B solved at a time: the weights' temporaries are (rows, WEIGHT_CHUNK)


def _nystrom_weights(pre: LowRankDiagonal, b: Tensor, v: Tensor, g_d: Tensor, noise: bool, reduce):
    """``(G_C (rows, k), G_W (k, k))`` of :meth:`NystromFamily._first_order`: ``G_C = 2 Q B`` and ``G_W =
    -B^T Q B`` with ``Q B = P^{-1} B - V (V^T B) / p``, plus the remainder's terms ``-2 diag(g) B`` and
    ``B^T diag(g) B`` where ``D`` is the remainder (no noise term; ``g = g_d``). ``B`` is solved in chunks of
    ``WEIGHT_CHUNK`` columns, so besides ``B`` and ``G_C`` no ``(rows, k)`` tensor is formed."""
    p = v.shape[-1]
    g_c = torch.empty_like(b)
    g_w = b.new_empty(b.shape[-1], b.shape[-1])
    for first in range(0, b.shape[-1], WEIGHT_CHUNK):
        cols = slice(first, min(first + WEIGHT_CHUNK, b.shape[-1]))
        chunk = b[..., cols]
        qb = pre.solve(chunk.to(pre.sqrt.dtype)).double().sub_(v @ reduce(v.mT @ chunk) / p)
        g_w[..., cols] = -(b.mT @ qb)
        if not noise:
            moved = g_d.unsqueeze(-1) * chunk  # diag(g) B
            g_w[..., cols] += b.mT @ moved
            qb.sub_(moved)  # G_C = 2 (Q B - diag(g) B)
        g_c[..., cols] = qb.mul_(2)
    return g_c, reduce(g_w)


class SubspaceNystromFamily(Family):
    """``P = C W^{-1} C^T + D`` for the eigen preconditioners ``P_0 = F F^T + D``, ``F = L U diag(lam)^{1/2}``:
    the eigenvectors ``U`` ``(..., m, k)`` of a base ``K`` fixed, ``C = L K U`` and ``W = U^T K U`` moved
    with ``K`` (and ``L``) from ``L U diag(lam)`` and ``diag(lam)`` (so ``P(theta_0) = P_0`` also for
    inexact eigenpairs). At ``theta_0``, ``C_0 W_0^{-1} = L U =: B`` and

        dP = dC B^T + B dC^T - B dW B^T + dD,   dC = L dK U + dL K U,   dW = U^T dK U,

    so with ``G = P^{-1} B``, ``H = B^T P^{-1} B`` and ``a_i = B^T v_i`` (all fixed, from the built
    preconditioner's ``k x k`` spectrum and ``n k^2`` products) the control variate's gradient is that of

        <L^T (2 G - mean_i 2 v_i a_i^T) - U (H - mean_i a_i a_i^T), K U> + <diag(P^{-1}) - mean_i v_i^2, D>
        + <2 G - mean_i 2 v_i a_i^T, L (K U)_0>

    with only ``K U`` (``k`` products with the base), ``D`` and ``L`` differentiated: no ``n k^2`` work
    under autograd. ``base(op)`` is ``K``, ``lift(op)`` the sparse ``L`` (None: the identity, for a
    Kronecker base of ``op`` itself), ``D`` is the noise; ``products(op)``, where given, is ``K U`` by
    structure (:func:`kronecker_products`). Eigenvalues at or below ``1e-10`` of the largest
    are left out of ``B`` (their part of ``P`` stays fixed). All ``k`` eigenvectors move: measured, moving
    only the top 64 or 128 of ~500 (the rest of ``P`` fixed) gave gradients worse than no control variate.

    ``part``: a run partitioned by rows (:mod:`.partitioned`): ``G``, ``B``, ``v`` and the noise are this rank's
    rows and ``L`` is applied by its rows; ``a_i`` is summed over the ranks (fixed weights), and each rank's share
    of the ``K U`` terms is ``<M_C, L (K U)>`` over its rows less ``<M_W, U^T K U>`` over its slice of the base's
    rows (``K U`` is computed on every rank; no ``m x k`` sum over ranks), the rest over its rows."""

    def __init__(
        self,
        vectors: Tensor,
        values: Tensor,
        precond: LowRankDiagonal,
        base: Callable[[Operator], Operator],
        lift: Callable[[Operator], Lift | None],
        products: Callable[[Operator], Tensor] | None = None,
        part: Rows | None = None,
    ) -> None:
        self.vectors, self.values, self.precond = vectors, values, precond
        self.base, self.lift, self.products, self.part = base, lift, products, part
        self._fixed: tuple[Tensor, Tensor, Tensor] | None = None
        self._b: Tensor | None = None  # B = L U (..., n, k), with _fixed

    def _setup(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(G (..., n, k), H (..., k, k), diag(P^{-1}) (..., n))`` from the built ``P``, in its dtype: three
        ``n k^2`` products, about what building ``P`` cost."""
        if self._fixed is None:
            pre = self.precond
            gram = pre.gram  # V = d^{-1/2} F, V^T V = W diag(s) W^T
            s = gram.values
            keep = self.values > 1e-10 * self.values.amax(-1, keepdim=True)
            scale = torch.where(keep, self.values.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(), 0.0).to(s.dtype)
            z = gram.factor @ gram.vectors  # V W (..., n, k)
            # P^{-1} F = d^{-1/2} V W diag(1 / (1 + s)) W^T; B = F diag(lam)^{-1/2}
            g = pre.inv_sqrt.unsqueeze(-1) * ((z * pre.c_inv.unsqueeze(-2)) @ gram.vectors.mT) * scale.unsqueeze(-2)
            h = (gram.vectors * (s * pre.c_inv).unsqueeze(-2)) @ gram.vectors.mT
            h = scale.unsqueeze(-1) * h * scale.unsqueeze(-2)
            p_inv_diag = pre.inv_sqrt.square() * (1 - (z.square() * pre.c_inv.unsqueeze(-2)).sum(-1))
            self._b = gram.factor * (pre.sqrt.unsqueeze(-1) * scale.unsqueeze(-2))  # B = L U (kept columns)
            self._fixed = (g, h, p_inv_diag)
        return self._fixed

    def control_variate(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        g, h, p_inv_diag = self._setup()
        part = self.part
        total = (lambda t: t) if part is None else (lambda t: part.sum(t, "the control variate's weights"))
        v = v.to(g.dtype)
        a = total(self._b.mT @ v)  # (..., k, p)
        p = v.shape[-1]
        m_c = 2 * (g - (v @ a.mT) / p)  # weight of C = L K U (..., n, k)
        m_w = h - (a @ a.mT) / p  # weight of W = U^T K U (..., k, k)
        k_op = self.base(op)
        u = self.vectors.to(k_op.dtype)
        ku = k_op._matmul(u) if self.products is None else self.products(op).to(k_op.dtype)
        lift = self.lift(op)
        m_c, m_w = m_c.to(ku.dtype), m_w.to(ku.dtype)
        if part is not None:
            out = _partitioned_subspace_terms(rows_and_values(lift, part), u, ku, m_c, m_w, part)
        else:
            lt_m = m_c if lift is None else lift.tmatmul(m_c, lift.values.detach().to(m_c.dtype))  # L^T m_c (..., m, k)
            out = ((lt_m - u @ m_w) * ku).sum((-2, -1)).double()
            if lift is not None and lift.values.requires_grad:  # the lift's own values are parameters
                out = out + (m_c * lift.matmul(ku.detach(), lift.values.to(ku.dtype))).sum((-2, -1)).double()
        noise = _noise(op) if part is None else part.local(_noise(op), -1)
        return out + ((p_inv_diag.to(noise.dtype) - v.square().mean(-1).to(noise.dtype)) * noise).sum(-1).double()


def _partitioned_subspace_terms(
    lift_rows: tuple[Lift, Tensor], u: Tensor, ku: Tensor, m_c: Tensor, m_w: Tensor, part: Rows
) -> Tensor:
    """This rank's share ``()`` of ``<m_c, L K U> - <m_w, U^T K U>`` (float64) for :class:`SubspaceNystromFamily`:
    ``<m_c_r, L_r (K U)>`` over its rows (``L_r (K U)`` differentiable in ``K U`` and the lift's values), less
    ``<m_w, U_S^T (K U)_S>`` over its slice ``S`` of the base's ``m`` rows (an even split, :func:`partition`).
    The shares sum to the whole over the ranks; no ``(m, k)`` sum over ranks is formed, and the ``m k^2`` flops of
    ``U^T K U`` are split between them."""
    lift, values = lift_rows
    c_term = (m_c * lift.matmul(ku, values.to(ku.dtype))).sum()
    start, stop = partition(u.shape[-2], len(part.parts))[part.rank]
    w_term = (m_w * (u[start:stop].mT @ ku[start:stop])).sum()
    return (c_term - w_term).double()


def kronecker_products(
    base: Callable[[Operator], Operator], vectors: list[Tensor], index: Tensor
) -> Callable[[Operator], Tensor]:
    """``K U`` for a Kronecker ``K = base(op)`` and ``U`` its product eigenvectors ``index`` ``(..., k)`` of
    the factor eigenvectors ``Q_i``: column ``j`` is ``(K_1 Q_1)[:, a_1j] (x) ...`` (``sum n_i^3`` flops and
    ``N k`` for the columns, rather than ``k`` products with ``K``)."""

    def products(op: Operator) -> Tensor:
        kron = base(op)
        moved = [f._matmul(q.to(f.dtype)) for f, q in zip(kron.factors, vectors)]
        return eigenvector_columns(moved, index)

    return products


def kronecker_rayleigh(vectors: list[Tensor]) -> Callable[[Operator], Tensor]:
    """For ``op = Kronecker + noise`` and fixed factor eigenvectors ``Q_i``: the Rayleigh quotients of all
    ``N`` product eigenvectors, ``diag(Q_1^T K_1 Q_1) (x) ...`` ``(..., N)`` (``sum n_i^3`` flops)."""

    def rayleigh(op: Operator) -> Tensor:
        parts = [(q * f._matmul(q.to(f.dtype)).to(q.dtype)).sum(-2) for f, q in zip(op.base.factors, vectors)]
        return kron_vector(parts)

    return rayleigh


class KroneckerShiftFamily(_TwoTermFamily):
    """``P = K + s I`` for ``op = K + noise``, ``s`` the noise's mean: ``spectrum`` ``(..., N)`` the built
    ``lambda + s`` and ``vectors`` the factors' eigenvectors (fixed)."""

    def __init__(self, vectors: list[Tensor], spectrum: Tensor) -> None:
        self.rayleigh = kronecker_rayleigh([q.double() for q in vectors])
        self.spectrum = spectrum.double()

    def logdet(self, op: Operator) -> Tensor:
        # value sum log(lambda + s); gradient sum (d lambda + ds) / (lambda + s), d lambda the Rayleigh moves
        moved = self.rayleigh(op) + _noise(op).double().mean(-1, keepdim=True)
        return self.spectrum.log().sum(-1) + ((moved - moved.detach()) / self.spectrum).sum(-1)

    def noise_direction(self, noise: Tensor) -> Tensor:
        return noise.mean(-1, keepdim=True).expand_as(noise)

    def quad(self, op: Operator, v: Tensor, a_v: Tensor) -> Tensor:
        # v^T (K + s I) v = v^T A v - v^T D v + s v^T v, from the engine's product A v
        noise = _noise(op)
        shift = noise.mean(-1, keepdim=True).unsqueeze(-1)
        return (v * a_v).sum(-2) + ((shift - noise.unsqueeze(-1)) * v.square()).sum(-2)
