"""The adapter's ``cholesky()`` from the structure, and gpytorch's ``log_prob`` under botorch's settings.

``import botorch`` turns gpytorch's ``fast_computations.log_prob`` off (and sets ``max_cholesky_size`` to
4096); gpytorch's ``MultivariateNormal.log_prob`` then calls torch's dense ``log_prob``, which reads
``scale_tril`` = the covariance's ``cholesky()``. The tests below set the same flags in-process.
"""

from __future__ import annotations

import gpytorch
import linear_operator
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from structgp.covariance import BlockDiag, Dense, Diagonal, Kronecker, LowRank, ScaledIdentity, SparseLifted
from structgp.distributions import MultivariateNormal
from structgp.integrations import cholesky_factor as cf
from structgp.integrations.gpytorch import StructuredLinearOperator, as_linear_operator
from tests.reference import F64, positive, spd


class _CholeskySizes(TorchDispatchMode):
    """Records the matrix size of every Cholesky factorisation run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.linalg_cholesky_ex, torch.ops.aten.cholesky):
            self.sizes.append(args[0].shape[-1])
        return func(*args, **(kwargs or {}))


def _botorch_settings():
    """The flags ``import botorch`` changes, as context managers."""
    return (
        gpytorch.settings.fast_computations(log_prob=False, covar_root_decomposition=False, solves=False),
        linear_operator.settings.max_cholesky_size(4096),
    )


def _lift(n_out: int, n_in: int) -> torch.Tensor:
    lift = torch.zeros(n_out, n_in, dtype=F64)
    rows = torch.arange(n_out)
    lift[rows, rows % n_in] = 0.7
    lift[rows, (rows + 1) % n_in] = 0.4
    return lift.to_sparse_csr()


CASES = {
    "diagonal": lambda: Diagonal(positive(2, 5)),
    "scaled_identity": lambda: ScaledIdentity(torch.tensor([0.3, 2.0], dtype=F64), 4),
    "kronecker": lambda: Kronecker(spd(2, seed=1), Dense(spd(3, 2, seed=2)), spd(2, seed=3)),
    "block_diag_natural": lambda: BlockDiag(spd(3, 2, seed=4)),
    "block_diag_permuted": lambda: BlockDiag([spd(2, seed=5), spd(3, seed=6), spd(2, seed=7)]) + Diagonal(positive(7)),
    "block_diag_ragged": lambda: BlockDiag([spd(2, seed=8), spd(3, seed=9)]),
    "low_rank_plus_diagonal": lambda: LowRank(torch.randn(3, 40, 2, dtype=F64)) + Diagonal(positive(3, 40)),
    "low_rank_plus_scaled_identity": lambda: LowRank(torch.randn(40, 3, dtype=F64)) + ScaledIdentity(0.5, 40),
    "sparse_lifted_plus_diagonal": lambda: SparseLifted(_lift(40, 5), Dense(spd(5, seed=10))) + Diagonal(positive(40)),
    "kronecker_plus_noise (dense)": lambda: Kronecker(spd(2, seed=11), spd(3, seed=12)) + ScaledIdentity(0.1, 6),
}


@pytest.mark.parametrize("case", CASES)
def test_structured_factor_is_the_cholesky_factor(case, monkeypatch):
    monkeypatch.setattr(cf, "BLOCK", 16)  # several diagonal blocks for the low-rank path
    op = CASES[case]()
    torch.testing.assert_close(cf.cholesky_factor(op), torch.linalg.cholesky(op.to_dense()), rtol=1e-10, atol=1e-10)
    factor = as_linear_operator(op).cholesky(upper=True).to_dense()
    torch.testing.assert_close(factor, torch.linalg.cholesky(op.to_dense(), upper=True), rtol=1e-10, atol=1e-10)


def test_low_rank_factorisation_runs_only_block_sized_choleskys_and_is_differentiable():
    w, d = torch.randn(2, 11, 2, dtype=F64), positive(11)
    with _CholeskySizes() as seen:
        factor = cf.low_rank_plus_diagonal_cholesky(w, d, block=4)
    assert seen.sizes and max(seen.sizes) <= 4
    torch.testing.assert_close(factor, torch.linalg.cholesky(w @ w.mT + torch.diag(d)), rtol=1e-10, atol=1e-10)
    inputs = (w.clone().requires_grad_(), d.clone().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, b: cf.low_rank_plus_diagonal_cholesky(a, b, block=4), inputs, fast_mode=True
    )


def test_gpytorch_log_prob_under_botorch_settings_factorises_by_structure():
    """Item 4: gpytorch's ``MultivariateNormal(m, as_linear_operator(LowRank(F) + D)).log_prob`` with
    botorch's settings reaches the adapter through ``cholesky()`` only; that factor is now formed block by
    block (no ``n x n`` factorisation), and the value and gradients equal structgp's."""
    n = 600
    f, d = torch.randn(n, 4, dtype=F64), positive(n)
    loc, y = torch.randn(n, dtype=F64), torch.randn(3, n, dtype=F64)
    expected = MultivariateNormal(loc, LowRank(f) + Diagonal(d)).log_prob(y)
    leaves = (f.clone().requires_grad_(), d.clone().requires_grad_())
    called = []
    original = StructuredLinearOperator._cholesky

    def spy(self, upper=False):
        called.append("cholesky")
        return original(self, upper)

    fast, max_size = _botorch_settings()
    with fast, max_size, _CholeskySizes() as seen, pytest.MonkeyPatch.context() as patch:
        patch.setattr(StructuredLinearOperator, "_cholesky", spy)
        dist = gpytorch.distributions.MultivariateNormal(
            loc, as_linear_operator(LowRank(leaves[0]) + Diagonal(leaves[1]))
        )
        value = dist.log_prob(y)
    assert called == ["cholesky"]
    assert max(seen.sizes) <= cf.BLOCK < n
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
    value.sum().backward()
    ref = [t.clone().requires_grad_() for t in (f, d)]
    MultivariateNormal(loc, LowRank(ref[0]) + Diagonal(ref[1])).log_prob(y).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-8)


def test_kronecker_log_prob_under_botorch_settings_factorises_the_factors_only():
    k1, k2 = spd(20, seed=13), spd(30, seed=14)
    loc, y = torch.zeros(600, dtype=F64), torch.randn(600, dtype=F64)
    fast, max_size = _botorch_settings()
    with fast, max_size, _CholeskySizes() as seen:
        value = gpytorch.distributions.MultivariateNormal(loc, as_linear_operator(Kronecker(k1, k2))).log_prob(y)
    assert sorted(seen.sizes) == [20, 30]
    expected = MultivariateNormal(loc, Kronecker(k1, k2)).log_prob(y)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)
