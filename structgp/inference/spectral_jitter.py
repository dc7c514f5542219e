"""Warned jitter for covariances answered from their eigenvalues, on the dense path's ladder.

The dense engine adds jitter ``r * mean(diag)`` (``r = 1e-8`` in float64, ``1e-6`` in float32, tenfold
steps up to ``settings(max_jitter=...)``) when a Cholesky factorisation fails. An engine that answers from
eigenvalues ``lambda`` never fails that way: it divides by them, and eigenvalues at or below their own
uncertainty (the accuracy of ``eigh`` and of the data's rounding; zeros clamped from rounding noise) give an
Inf, a NaN or a silently wrong answer. :func:`eigenvalue_jitter` picks the first rung of the same ladder
that lifts the smallest eigenvalue above that uncertainty, warns with a :class:`JitterWarning` stating the
amount, and raises :class:`NotPositiveDefiniteError` naming the operator when ``max_jitter`` is not enough.

The rung is found in closed form (no loop over tenfold steps), so the arithmetic also runs under
``torch.func.vmap``; the warning and the error need host reads and are skipped there (as the dense path's).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.validation import host_readable
from structgp.inference import report
from structgp.inference.cholesky import JitterWarning, NotPositiveDefiniteError, first_jitter


def eigenvalue_jitter(low: Tensor, uncertainty: Tensor, mean_diag: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """The jitter ``(...)`` (float64, detached) to add to every eigenvalue of ``what``.

    low: the smallest eigenvalue ``(...)``; uncertainty: the size ``(...)`` at or below which an eigenvalue
    is not resolved; mean_diag: the mean diagonal ``(...)`` the ladder is relative to; dtype: the data's
    (it sets the first rung). Zero where ``low > uncertainty``; else the smallest ``r * mean_diag``,
    ``r = first * 10^k``, with ``low + r * mean_diag > uncertainty``.
    """
    low, uncertainty = low.detach().double(), uncertainty.detach().double()
    mean_diag = mean_diag.detach().double()
    scale = mean_diag.abs().clamp_min(torch.finfo(torch.float64).tiny)
    first = first_jitter(dtype)
    need = uncertainty - low
    ratio = (need / (first * scale)).clamp_min(1e-300)
    steps = (torch.floor(torch.log10(ratio)) + 1).clamp_min(0)
    rel = first * torch.pow(10.0, steps)
    needed = need >= 0
    jitter = torch.where(needed, rel * scale, torch.zeros_like(scale))
    if host_readable(jitter):
        _check(needed, low, uncertainty, jitter, rel, mean_diag, dtype, what)
    return jitter


def _check(
    added: Tensor, low: Tensor, uncertainty: Tensor, jitter: Tensor, rel: Tensor, mean_diag: Tensor, dtype, what: str
) -> None:
    """Raise where no rung up to ``max_jitter`` lifts the smallest eigenvalue (or there is no scale to be
    relative to: a zero matrix); else warn with the amount."""
    if not bool(added.any()):
        return
    max_jitter = _config.current().max_jitter
    if bool((added & ~(mean_diag > 0)).any()):
        raise NotPositiveDefiniteError(
            f"{what} is singular with a zero diagonal: jitter relative to it cannot help; add noise "
            "(op + ScaledIdentity(s, n))"
        )
    too_much = added & ((rel > max_jitter * (1 + 1e-9)) | ~(low + jitter > uncertainty))
    if bool(too_much.any()):
        bad = too_much.nonzero().tolist() if too_much.dim() else []
        where = f" (batch entries {bad[:10]})" if bad else ""
        raise NotPositiveDefiniteError(
            f"{what} is singular in {dtype}{where}: its smallest eigenvalue {float(low.min()):.3g} is below "
            f"the eigenvalues' uncertainty {float(uncertainty.max()):.3g}, and jitter up to {max_jitter:g} "
            "times the mean diagonal does not lift it; add noise (op + ScaledIdentity(s, n)) or raise "
            "structgp.settings(max_jitter=...)"
        )
    amount = float(jitter.max())
    step = float(rel[added].max())
    warnings.warn(
        f"{what} was not positive definite in {dtype} (smallest eigenvalue {float(low.min()):.3g}, not above "
        f"the eigenvalues' uncertainty {float(uncertainty.max()):.3g}): added jitter {amount:.3g} "
        f"({step:.0e} of the mean diagonal {float(mean_diag.max()):.3g}) to the diagonal",
        JitterWarning,
        stacklevel=4,
    )
    report.record_jitter(amount)


def kronecker_uncertainty(values: list[Tensor], clamped: list[Tensor] | None, dtype: torch.dtype) -> Tensor:
    """How far the eigenvalues ``l_1 (x) ... (x) l_d`` (clamped at 0, ``(..., n_i)`` each) may be off ``(...)``.

    A factor's eigenvalues are off by ``max(n_i eps_64, eps_data) max l_i`` (``eigh`` in float64; the data's
    rounding) plus what clamping set to 0 (``clamped`` ``(...)``); a product's error is each factor's error
    times the other factors' largest eigenvalues.
    """
    rel = max(sum(v.shape[-1] for v in values) * torch.finfo(torch.float64).eps, torch.finfo(dtype).eps)
    highs = [v.amax(-1) for v in values]
    errors = [rel * h for h in highs]
    if clamped is not None:
        errors = [e + c for e, c in zip(errors, clamped)]
    total = torch.zeros_like(highs[0])
    for i, e in enumerate(errors):
        for j, h in enumerate(highs):
            if j != i:
                e = e * h
        total = total + e
    return total
