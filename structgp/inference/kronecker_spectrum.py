"""Eigendecompositions of the factors of a Kronecker product: the one place they are computed.

For ``K = K_1 (x) ... (x) K_d`` with ``K_i = Q_i diag(l_i) Q_i^T`` (``sum n_i^3`` flops):

    eigenvalues:   l_1 (x) ... (x) l_d                 (row-major: the last factor varies fastest)
    eigenvectors:  Q = Q_1 (x) ... (x) Q_d
    f(K) x = Q diag(f(l)) Q^T x                         (factor-wise products, 2 N sum n_i flops a column)

Each factor is decomposed in float64 from its symmetric part. There are two readings of the result:

- PSD (``psd=True``, the default), for covariances: an eigenvalue below zero by more than rounding
  (``100 n eps`` of the largest, ``eps`` of the data's precision) raises
  :class:`~structgp.inference.cholesky.NotPositiveDefiniteError` naming the factor; the others are clamped at
  0 (rounding noise of either sign around a zero eigenvalue), and how far below 0 they were is kept
  (``FactorSpectra.clamped``: jitter added to the product must exceed it).
- raw (``psd=False``): the eigenvalues as ``eigh`` returns them, for rules defined on any symmetric operator
  (``eigsh``; matrix functions of ``K + s I``, which can be positive definite while a factor is not).

:func:`kronecker_spectra` keeps both readings, detached, on the Kronecker operator under the key ``"eigh"``,
recomputed when its tensors change: the eigen engine, its preconditioner, the spectral root, ``eigsh`` and the
matrix functions of one operator share one factorisation. ``differentiable=True`` instead keeps the autograd
graph through ``eigh`` where a factor requires grad (uncached: a second backward would find the graph freed).
:func:`factor_spectra` decomposes matrices that are not a Kronecker operator's own factors, uncached.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from structgp.covariance.kron import kron_matmul, kron_vector
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.validation import value_checks_enabled
from structgp.inference._cache import cached, lookup
from structgp.inference.cholesky import NotPositiveDefiniteError

_KEY = "eigh"


@dataclasses.dataclass(frozen=True)
class FactorSpectra:
    """``K_i = Q_i diag(l_i) Q_i^T`` for each factor, eigenvalues ascending."""

    values: list[Tensor]  # l_i (..., n_i)
    vectors: list[Tensor]  # Q_i (..., n_i, n_i)
    clamped: list[Tensor] | None = None  # the PSD reading's max(0, -min raw l_i) (...): rounding set to 0

    def eigenvalues(self) -> Tensor:
        """``l_1 (x) ... (x) l_d`` ``(..., N)``, in the product's row order (not sorted)."""
        return kron_vector(self.values)

    def to(self, dtype: torch.dtype) -> FactorSpectra:
        """Values and vectors in ``dtype`` (e.g. the data's, for products with it)."""
        clamped = None if self.clamped is None else [c.to(dtype) for c in self.clamped]
        return FactorSpectra([v.to(dtype) for v in self.values], [q.to(dtype) for q in self.vectors], clamped)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """What the cache keeps: the raw reading, and the PSD one (None, with the reason, when a factor is not)."""

    raw: FactorSpectra
    psd: FactorSpectra | None
    problem: str | None


def factor_names(count: int) -> list[str]:
    """The names errors give the factors of a Kronecker product: ``"Kronecker factor i"``."""
    return [f"Kronecker factor {i}" for i in range(count)]


def factor_spectra(
    mats: list[Tensor], names: list[str] | None = None, *, psd: bool = True, differentiable: bool = False
) -> FactorSpectra:
    """Float64 eigendecompositions of the symmetric parts of ``mats`` ``(..., n_i, n_i)``, uncached.

    ``psd``: check and clamp (see the module; errors name ``names[i]``, default ``"Kronecker factor i"``).
    ``differentiable``: keep the autograd graph through ``eigh``; otherwise the results are detached.
    """
    raw = _eigh(mats, differentiable)
    if not psd:
        return raw
    problem = _psd_problem(raw, [m.dtype for m in mats], names or factor_names(len(mats)))
    if problem is not None:
        raise NotPositiveDefiniteError(problem)
    return _clamped(raw)


def kronecker_spectra(kron: Kronecker, *, psd: bool = True, differentiable: bool = False) -> FactorSpectra:
    """The eigendecompositions of ``kron``'s factors, cached on ``kron`` (detached).

    ``differentiable``: where gradients are being recorded and a tensor of ``kron`` requires grad, decompose
    with the graph instead (uncached).
    """
    if differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in kron._tensors()):
        return factor_spectra(kron.factor_matrices(), psd=psd, differentiable=True)
    entry = cached(kron, _KEY, lambda: _entry(kron), detached=True)
    if not psd:
        return entry.raw
    if entry.problem is not None:
        raise NotPositiveDefiniteError(entry.problem)
    return entry.psd


def cached_kronecker_spectra(kron: Kronecker, *, psd: bool = True) -> FactorSpectra | None:
    """What :func:`kronecker_spectra` would return from the cache, or None where it would compute (or, for
    ``psd``, raise): computes nothing."""
    entry = lookup(kron, _KEY)
    if entry is None:
        return None
    return entry.psd if psd else entry.raw


def to_eigenbasis(vectors: list[Tensor], x: Tensor) -> Tensor:
    """``Q^T x`` for ``Q = Q_1 (x) ... (x) Q_d`` (``Q_i`` ``(..., n_i, n_i)``) and ``x`` ``(..., N, c)``."""
    return kron_matmul([q.mT for q in vectors], x)


def from_eigenbasis(vectors: list[Tensor], y: Tensor) -> Tensor:
    """``Q y`` for coefficients ``y`` ``(..., N, c)`` in the eigenbasis."""
    return kron_matmul(vectors, y)


def spectral_matmul(vectors: list[Tensor], weights: Tensor, x: Tensor) -> Tensor:
    """``Q diag(weights) Q^T x`` ``(..., N, c)``: ``f(K) x`` for ``weights = f(eigenvalues)`` ``(..., N)``."""
    return from_eigenbasis(vectors, weights.unsqueeze(-1) * to_eigenbasis(vectors, x))


def eigenvector_columns(vectors: list[Tensor], index: Tensor, scale: Tensor | None = None) -> Tensor:
    """Columns ``index`` ``(..., r)`` (positions in the product's row order) of ``Q_1 (x) ... (x) Q_d``
    ``-> (..., N, r)``, times ``scale`` ``(..., r)`` if given (applied to the first factor's ``n_1 x r``
    picks, not to the ``N x r`` result). Never forms ``Q``: each column is the product of one column per
    factor."""
    picks, rest = [], index
    for q in reversed(vectors):  # the last factor's position varies fastest
        n_i = q.shape[-1]
        idx = rest % n_i
        batch, r = torch.broadcast_shapes(q.shape[:-2], idx.shape[:-1]), idx.shape[-1]
        where = idx.expand(*batch, r).unsqueeze(-2).expand(*batch, n_i, r)
        picks.append(q.expand(*batch, n_i, n_i).gather(-1, where))
        rest = rest // n_i
    out = picks[-1] if scale is None else picks[-1] * scale.unsqueeze(-2)
    for cols in reversed(picks[:-1]):
        prod = out.unsqueeze(-2) * cols.unsqueeze(-3)
        out = prod.reshape(*prod.shape[:-3], prod.shape[-3] * prod.shape[-2], prod.shape[-1])
    return out


def _entry(kron: Kronecker) -> _Entry:
    raw = _eigh(kron.factor_matrices(), differentiable=False)
    problem = _psd_problem(raw, [kron.dtype] * len(raw.values), factor_names(len(raw.values)))
    return _Entry(raw, None if problem is not None else _clamped(raw), problem)


def _eigh(mats: list[Tensor], differentiable: bool) -> FactorSpectra:
    values, vectors = [], []
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for m in mats:
            m64 = (m if differentiable else m.detach()).double()
            lam, q = torch.linalg.eigh((m64 + m64.mT) / 2)
            values.append(lam)
            vectors.append(q)
    return FactorSpectra(values, vectors)


def _psd_problem(raw: FactorSpectra, dtypes: list[torch.dtype], names: list[str]) -> str | None:
    """Why a factor is not positive semidefinite (the first such), or None. The tolerance is rounding in the
    data's precision ``dtypes[i]``; nothing is checked where values cannot be read (vmap, compile)."""
    for lam, dtype, name in zip(raw.values, dtypes, names):
        if not value_checks_enabled(lam):
            continue
        top = lam.abs().amax(-1, keepdim=True)
        tol = 100 * lam.shape[-1] * torch.finfo(dtype).eps * top
        if bool((lam < -tol).any()):
            return f"{name} is not positive semidefinite: smallest eigenvalue {float(lam.min()):.3g}"
    return None


def _clamped(raw: FactorSpectra) -> FactorSpectra:
    below = [(-lam.amin(-1)).clamp_min(0) for lam in raw.values]
    return FactorSpectra([lam.clamp_min(0) for lam in raw.values], raw.vectors, below)
