"""A grid with missing cells, ``S K S^T + D`` (a selection lift of a Kronecker product plus diagonal noise),
by PCG + SLQ with the projected Kronecker deflation preconditioner (engine ``"masked_grid"``, family ``"cg"``).

This is the iterative engine (:mod:`.iterative`: one batched PCG run, SLQ with the preconditioner's exact
log determinant as control variate, unbiased first-order gradients), with the preconditioner of
:mod:`.masked_kronecker_preconditioner` (``P = F F^T + D``, ``F = S Q_I Lambda_I^{1/2}`` from the grid's top
eigenpairs): each PCG step is one gather and one scatter of the observed cells and one Kronecker product for
``A``, and a truncated factor-wise transform each way for ``P^{-1}``; nothing ``n x n``, ``n x N`` or
``N x N`` is formed, and memory is ``O(N (probes + 1) + r^2)``.

It is planned as exact (to tolerance): ``A - P`` is PSD with trace at most ``TAIL_TOL * min(d)``, so the part
of ``log det A`` left to SLQ lies in ``[0, TAIL_TOL]`` nats in total and its estimate is far more accurate
than that bound; the solves converge to ``settings(cg_tol=...)`` in a few steps (``P^{-1} A`` has eigenvalues
in ``[1, 1 + TAIL_TOL]``). Gradients are the iterative engine's: exact for the quadratic term, a seeded
Hutchinson estimate for the log determinant's.
"""

from __future__ import annotations

from structgp import _config
from structgp.covariance.operator import Operator
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.sum import AddedDiagonal
from structgp.inference.iterative import ConjugateGradients, matvec_flops
from structgp.inference.masked_kronecker_preconditioner import MAX_RANK, is_masked_grid
from structgp.inference.plan import Cost, register

# planning constant: PCG steps of a masked grid with the deflation preconditioner at cg_tol 1e-6 (measured 3-6)
EXPECTED_STEPS = 8


@register(SparseLifted, Operator)  # any diagonal noise; applies to selection lifts of a Kronecker product
class MaskedGrid(ConjugateGradients):
    name = "masked_grid"
    method = "cg"
    exact = True  # to tolerance: see the module

    def why(self, op: Operator) -> str | None:
        if not is_masked_grid(op):
            return None
        lifted: SparseLifted = op.base
        return (
            f"selection lift ({lifted.lift.n_out} of {lifted.n_in} grid cells) of a Kronecker product + "
            f"{type(op.noise).__name__}: PCG + SLQ with the projected Kronecker deflation preconditioner"
        )

    def cost(self, op: AddedDiagonal) -> Cost:
        cfg = _config.current()
        lifted: SparseLifted = op.base
        n, cells = op.n, lifted.n_in
        rank = min(MAX_RANK, cells)  # an upper bound: the rank is set by the spectrum, known only when it runs
        columns = cfg.num_probes + 1
        base_flops = matvec_flops(lifted.base)
        per_step = columns * (2 * base_flops + 4 * n + 2 * cells + 4 * rank * rank / max(1, columns))
        setup = rank**3 + 2 * cells * rank + 3 * base_flops
        bytes_per = op.dtype.itemsize
        nbytes = (6 * columns * n + 2 * columns * cells) * bytes_per + 3 * rank * rank * 8
        return Cost(setup + min(EXPECTED_STEPS, cfg.max_iter) * per_step, float(nbytes))
