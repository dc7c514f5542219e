"""Spectra of operators: the top-``k`` eigenpairs (``eigsh``) and the full spectrum (``eigvalsh``).

Structures whose eigendecomposition is a function of small pieces are answered exactly
(``functools.singledispatch`` rules): a diagonal by sorting, a Kronecker product from its factors'
eigendecompositions (``lambda = l_1 (x) l_2 (x) ...``, eigenvectors ``q_1 (x) q_2 (x) ...``; the top ``k`` are
picked among the ``N`` products without forming an ``N x N`` matrix), ``W W^T`` from the ``r x r`` Gram
``W^T W``, and any of these plus ``s I`` by the shift. Small operators go to a dense ``eigh``. Others run
block Lanczos with full reorthogonalisation (block size ``k``, a seeded random start block) until the
residual ``|A v - theta v|`` of every wanted Ritz pair is below ``tol`` times the largest ``|theta|``.

Gradients: exact rules differentiate through the factor (or Gram / dense) ``eigh``. For Lanczos results
the eigenvalues are the Rayleigh-Ritz values of the final Krylov basis ``Q`` (held fixed) recomputed with
autograd, ``eig(Q^T A Q)``, so ``d lambda_i = v_i^T dA v_i`` is exact; eigenvector gradients are those
within the Krylov subspace. Like ``torch.linalg.eigh``, eigenvector gradients need distinct eigenvalues.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator, guard_dense
from structgp.covariance.permuted import Permuted
from structgp.covariance.sum import AddedDiagonal
from structgp.inference.gram_spectrum import gram_spectrum
from structgp.inference.kronecker_spectrum import eigenvector_columns, kronecker_spectra

DENSE_N = 256  # operators up to this size are decomposed densely (exact, and faster than Lanczos)


class Eigenpairs(NamedTuple):
    """``eigenvalues`` ``(..., k)``, ordered from the requested end inwards (descending for the largest),
    and orthonormal ``eigenvectors`` ``(..., n, k)`` (column ``i`` belongs to eigenvalue ``i``)."""

    eigenvalues: Tensor
    eigenvectors: Tensor


def eigsh(
    op: Operator,
    k: int,
    *,
    largest: bool = True,
    tol: float | None = None,
    max_iter: int | None = None,
    seed: int | None = None,
) -> Eigenpairs:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator ``op`` ``(..., n, n)``.

    Exact by structure where a rule exists (see the module), else dense ``eigh`` up to ``n = 256`` (or for
    ``k >= n / 4`` while the dense matrix fits ``settings(dense_limit=...)``), else
    block Lanczos: ``tol`` is the relative residual (default ``sqrt(eps)`` of the dtype), ``max_iter`` caps
    the number of block steps (default ``settings(max_iter=...)``), ``seed`` seeds the start block
    (default ``settings(seed=...)``).
    """
    if not isinstance(op, Operator):
        raise TypeError(f"op: expected a structgp operator, got {type(op).__name__}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= op.n:
        raise ValueError(f"k: expected an int in [1, {op.n}], got {k!r}")
    exact = structured_eigsh(op, k, largest)
    if exact is not None:
        return exact
    if op.n <= DENSE_N or (4 * k >= op.n and _dense_fits(op)):  # small, or most of the spectrum wanted
        return _dense_eigsh(op, k, largest)
    cfg = _config.current()
    return _block_lanczos(
        op,
        k,
        largest,
        tol if tol is not None else torch.finfo(op.dtype).eps ** 0.5,
        max_iter if max_iter is not None else cfg.max_iter,
        cfg.seed if seed is None else seed,
    )


def _sym(a: Tensor) -> Tensor:
    """The symmetric part ``(A + A^T) / 2`` (the operators are symmetric; this makes gradients symmetric too)."""
    return (a + a.mT) / 2


def _pick(values: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` extreme entries of ``values`` ``(..., m)`` from the requested end, and their positions."""
    return torch.topk(values, k, dim=-1, largest=largest, sorted=True)


def _columns(vectors: Tensor, idx: Tensor) -> Tensor:
    """``vectors[..., :, idx]`` per batch member: ``(..., n, m)`` and ``(..., k)`` -> ``(..., n, k)``."""
    batch = torch.broadcast_shapes(vectors.shape[:-2], idx.shape[:-1])
    vectors = vectors.expand(*batch, *vectors.shape[-2:])
    idx = idx.expand(*batch, idx.shape[-1]).unsqueeze(-2).expand(*batch, vectors.shape[-2], idx.shape[-1])
    return vectors.gather(-1, idx)


def _dense_fits(op: Operator) -> bool:
    return math.prod(op.shape) * op.dtype.itemsize <= _config.current().dense_limit


def _dense_eigsh(op: Operator, k: int, largest: bool) -> Eigenpairs:
    guard_dense(op, "eigsh (dense eigh)")
    values, vectors = torch.linalg.eigh(_sym(op._to_dense().double()))
    top, idx = _pick(values, k, largest)
    return Eigenpairs(top.to(op.dtype), _columns(vectors, idx).to(op.dtype))


# -- exact rules ---------------------------------------------------------------------------------------
@functools.singledispatch
def structured_eigsh(op: Operator, k: int, largest: bool) -> Eigenpairs | None:
    """The top-``k`` eigenpairs of ``op`` from its structure, or None when it has no exact rule."""
    return None


def _diagonal_eigsh(op: Operator, k: int, largest: bool) -> Eigenpairs:
    d = op.diagonal().expand(*op.batch_shape, op.n)
    top, idx = _pick(d, k, largest)
    vectors = torch.nn.functional.one_hot(idx, op.n).to(op.dtype).mT
    return Eigenpairs(top, vectors)


@structured_eigsh.register
def _(op: Diagonal, k: int, largest: bool) -> Eigenpairs:
    return _diagonal_eigsh(op, k, largest)


@structured_eigsh.register
def _(op: ScaledIdentity, k: int, largest: bool) -> Eigenpairs:
    return _diagonal_eigsh(op, k, largest)


@structured_eigsh.register
def _(op: Dense, k: int, largest: bool) -> Eigenpairs | None:
    return _dense_eigsh(op, k, largest) if op.n <= DENSE_N else None


@structured_eigsh.register
def _(op: Kronecker, k: int, largest: bool) -> Eigenpairs:
    if op.is_diagonal:
        return _diagonal_eigsh(op, k, largest)
    return _kronecker_eigsh(op, k, largest, None)


def _kronecker_eigsh(op: Kronecker, k: int, largest: bool, shift: Tensor | None) -> Eigenpairs:
    """``lambda = l_1 (x) ... (+ s)``: the top ``k`` products and the Kronecker products of their factor
    eigenvectors (the raw factor spectra: the factors need not be positive semidefinite)."""
    spectra = kronecker_spectra(op, psd=False, differentiable=True)
    values = spectra.eigenvalues()
    if shift is not None:
        values = values + shift.double().unsqueeze(-1)
    top, idx = _pick(values, k, largest)
    vectors = eigenvector_columns(spectra.vectors, idx)  # (..., N, k)
    return Eigenpairs(top.to(op.dtype), vectors.to(op.dtype))


def _gram_eigsh(w: Tensor, k: int, shift: Tensor | None) -> Eigenpairs | None:
    """Top ``k`` of ``W W^T (+ s I)`` from the ``r x r`` Gram ``W^T W = V diag(mu) V^T``: ``U = W V mu^{-1/2}``."""
    if k > w.shape[-1]:
        return None
    gram = gram_spectrum(w)
    top, idx = _pick(gram.values, k, True)
    vectors = gram.eigenvectors(_columns(gram.vectors, idx), top)
    values = top if shift is None else top + shift.double().unsqueeze(-1)
    return Eigenpairs(values.to(w.dtype), vectors.to(w.dtype))


@structured_eigsh.register
def _(op: LowRank, k: int, largest: bool) -> Eigenpairs | None:
    return _gram_eigsh(op.factor, k, None) if largest else None


@structured_eigsh.register
def _(op: AddedDiagonal, k: int, largest: bool) -> Eigenpairs | None:
    if not isinstance(op.noise, ScaledIdentity):
        return None
    s = op.noise.scale
    if isinstance(op.base, Kronecker) and not op.base.is_diagonal:
        return _kronecker_eigsh(op.base, k, largest, s)
    if isinstance(op.base, LowRank) and largest:
        return _gram_eigsh(op.base.factor, k, s)
    return None


# -- block Lanczos ------------------------------------------------------------------------------------
def _block_lanczos(op: Operator, k: int, largest: bool, tol: float, max_iter: int, seed: int) -> Eigenpairs:
    n, batch, dtype = op.n, op.batch_shape, op.dtype
    b = k
    gen = torch.Generator().manual_seed(seed)

    def random(cols: int) -> Tensor:
        return torch.randn(*batch, n, cols, generator=gen, dtype=torch.float64).to(dtype=dtype, device=op.device)

    with torch.no_grad():
        q = torch.linalg.qr(random(b)).Q
        basis, diag_blocks, off_blocks = [q], [], []
        scale = torch.zeros(batch, dtype=torch.float64, device=op.device)  # a running estimate of |A|
        steps = max(1, max_iter)
        for step in range(steps):
            w = op._matmul(q)
            a = q.mT @ w
            diag_blocks.append(((a + a.mT) / 2).double())
            scale = torch.maximum(scale, diag_blocks[-1].abs().amax((-2, -1)))
            w = w - q @ a
            if off_blocks:
                w = w - basis[-2] @ off_blocks[-1].mT.to(dtype)
            full = torch.cat(basis, dim=-1)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - full @ (full.mT @ w)
            room = n - full.shape[-1]
            last = room == 0 or step == steps - 1  # room == 0: the Krylov space is the whole space (exact)
            check = last or step < 8 or step % (step // 8) == 0  # test convergence less often as T grows
            if check:
                theta, s = torch.linalg.eigh(_block_tridiagonal(diag_blocks, off_blocks))
                top, idx = _pick(theta, k, largest)
                if last:
                    break
            q, beta = _next_block(w, full, random, scale)
            if check:
                resid = (beta @ s[..., -w.shape[-1] :, :]).norm(dim=-2)  # (..., m): |A v - theta v| per Ritz pair
                bound = tol * theta.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
                if bool((resid.gather(-1, idx) <= bound).all()):
                    break
            if room < q.shape[-1]:  # the last block only fills the rest of the space
                q, beta = q[..., :room], beta[..., :room, :]
            basis.append(q)
            off_blocks.append(beta)
        basis_t = torch.cat(basis[: len(diag_blocks)], dim=-1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in op._tensors()):
        return _rayleigh_ritz(op, basis_t, k, largest)
    vectors = basis_t @ _columns(s, idx).to(dtype)
    return Eigenpairs(top.to(dtype), vectors)


def _next_block(w: Tensor, full: Tensor, random, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``Q_{j+1} B_j = W`` with ``Q_{j+1}`` orthonormal and orthogonal to the basis; directions where ``W``
    vanished relative to ``scale`` ``(...)`` (an invariant subspace was found) are replaced by random ones
    (their ``B_j`` rows are ~0)."""
    q, r = torch.linalg.qr(w)
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)
    tiny = r.diagonal(dim1=-2, dim2=-1).abs().double() <= 1e3 * torch.finfo(w.dtype).eps * scale.unsqueeze(-1)
    if bool(tiny.any()):
        fresh = torch.where(tiny.unsqueeze(-2), random(w.shape[-1]), w)
        for _ in range(2):
            fresh = fresh - full @ (full.mT @ fresh)
        q = torch.linalg.qr(fresh).Q
    return q, (q.mT @ w).double()


def _block_tridiagonal(diag_blocks: list[Tensor], off_blocks: list[Tensor]) -> Tensor:
    """``T`` with blocks ``A_j`` ``(b_j, b_j)`` on the diagonal and ``B_j`` ``(b_{j+1}, b_j)`` below it
    (``B_j^T`` above), float64."""
    sizes = [a.shape[-1] for a in diag_blocks]
    starts = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
    batch = torch.broadcast_shapes(*(a.shape[:-2] for a in diag_blocks + off_blocks))
    t = diag_blocks[0].new_zeros(*batch, starts[-1], starts[-1])
    for j, a in enumerate(diag_blocks):
        t[..., starts[j] : starts[j + 1], starts[j] : starts[j + 1]] = a
    for j, beta in enumerate(off_blocks[: len(diag_blocks) - 1]):
        t[..., starts[j + 1] : starts[j + 2], starts[j] : starts[j + 1]] = beta
        t[..., starts[j] : starts[j + 1], starts[j + 1] : starts[j + 2]] = beta.mT
    return t


def _rayleigh_ritz(op: Operator, basis: Tensor, k: int, largest: bool) -> Eigenpairs:
    """Differentiable Ritz pairs on a fixed basis ``Q``: ``eig(Q^T A Q)``, ``v = Q s``."""
    theta, s = torch.linalg.eigh(_sym((basis.mT @ op._matmul(basis)).double()))
    top, idx = _pick(theta, k, largest)
    return Eigenpairs(top.to(op.dtype), basis @ _columns(s, idx).to(op.dtype))


# -- the full spectrum ---------------------------------------------------------------------------------
@functools.singledispatch
def eigvalsh(op: Operator) -> Tensor:
    """All eigenvalues of ``op`` ``(..., n)`` in ascending order (as ``torch.linalg.eigvalsh``), from the
    structure where a rule exists, else from the dense matrix (guarded by ``settings(dense_limit=...)``)."""
    guard_dense(op, "eigvalsh")
    return torch.linalg.eigvalsh(_sym(op._to_dense()))


@eigvalsh.register
def _(op: Diagonal) -> Tensor:
    return op.diag.sort(-1).values


@eigvalsh.register
def _(op: ScaledIdentity) -> Tensor:
    return op.diagonal()


@eigvalsh.register
def _(op: Kronecker) -> Tensor:
    if op.is_diagonal:
        return op.diagonal().sort(-1).values
    spectra = kronecker_spectra(op, psd=False, differentiable=True)
    return spectra.eigenvalues().sort(-1).values.to(op.dtype)


@eigvalsh.register
def _(op: LowRank) -> Tensor:
    mu = gram_spectrum(op.factor).values.to(op.dtype)  # the nonzero eigenvalues of W W^T (r - n extra 0s if r > n)
    n, r = op.n, op.rank
    if r >= n:
        return mu[..., r - n :]
    zeros = mu.new_zeros(*mu.shape[:-1], n - r)
    return torch.cat([zeros, mu], dim=-1).sort(-1).values


@eigvalsh.register
def _(op: AddedDiagonal) -> Tensor:
    if isinstance(op.noise, ScaledIdentity):  # a shift of the base's spectrum
        return eigvalsh(op.base) + op.noise.scale.unsqueeze(-1)
    guard_dense(op, "eigvalsh")
    return torch.linalg.eigvalsh(_sym(op._to_dense()))


@eigvalsh.register
def _(op: BlockDiag) -> Tensor:
    parts = [eigvalsh(g).flatten(-2) for g in op.groups]  # each group: (..., g, m) eigenvalues
    batch = op.batch_shape
    return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], dim=-1).sort(-1).values


# -- Permuted: A = P B P^T has B's eigenvalues and eigenvectors P v ------------------------------------
@eigvalsh.register
def _(op: Permuted) -> Tensor:
    return eigvalsh(op.base)


@structured_eigsh.register
def _(op: Permuted, k: int, largest: bool) -> Eigenpairs | None:
    pairs = structured_eigsh(op.base, k, largest)
    if pairs is None:
        return None
    return Eigenpairs(pairs.eigenvalues, op.from_base_order(pairs.eigenvectors))
