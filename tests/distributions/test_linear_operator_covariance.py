"""MultivariateNormal over linear_operator ``LinearOperator`` covariances (gpytorch kernels' lazy output):
converted to the matching structgp structure, else to ``Dense`` under the size guard."""

from __future__ import annotations

import gpytorch
import pytest
import torch
import torch.distributions as tdist
from linear_operator.operators import (
    AddedDiagLinearOperator,
    BlockDiagLinearOperator,
    ConstantDiagLinearOperator,
    ConstantMulLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
    MatmulLinearOperator,
)

import structgp as sg
from structgp.covariance import (
    AddedDiagonal,
    BlockDiag,
    Dense,
    DensifyError,
    Diagonal,
    Kronecker,
    LowRank,
    ScaledIdentity,
    as_operator,
)
from structgp.distributions import MultivariateNormal
from structgp.integrations.gpytorch import as_linear_operator
from tests.reference import F64, positive, spd


def _check(cov, expected_type):
    """The distribution's covariance has ``expected_type`` and its log_prob is torch's on the dense matrix."""
    n = cov.shape[-1]
    loc = torch.randn(n, dtype=F64)
    dist = MultivariateNormal(loc, cov)
    assert isinstance(dist._unbroadcasted_covariance, expected_type)
    x = torch.randn(3, *cov.shape[:-1], dtype=F64)
    expected = tdist.MultivariateNormal(loc, cov.to_dense()).log_prob(x)
    torch.testing.assert_close(dist.log_prob(x), expected, rtol=1e-10, atol=1e-10)
    return dist._unbroadcasted_covariance


def test_gpytorch_kernel_output_is_accepted():
    x = torch.rand(7, 2, dtype=F64)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    kernel.outputscale = 1.5
    lazy = kernel(x)
    assert type(lazy).__name__ == "LazyEvaluatedKernelTensor"
    noisy = lazy.add_jitter(1e-4)
    _check(noisy, AddedDiagonal)
    y = torch.randn(7, dtype=F64)
    value = MultivariateNormal(torch.zeros(7, dtype=F64), noisy).log_prob(y)
    value.backward()  # gradients reach the kernel's hyperparameters
    assert kernel.raw_outputscale.grad is not None and kernel.base_kernel.raw_lengthscale.grad is not None


def test_common_structures_map_to_structgp_structures():
    a, b = spd(2, seed=1), spd(3, seed=2)
    kron = KroneckerProductLinearOperator(DenseLinearOperator(a), DenseLinearOperator(b))
    op = _check(kron, Kronecker)
    assert all(isinstance(f, Dense) for f in op.factors)
    noisy = _check(
        AddedDiagLinearOperator(kron, ConstantDiagLinearOperator(torch.tensor([0.3], dtype=F64), 6)), AddedDiagonal
    )
    assert isinstance(noisy.base, Kronecker) and isinstance(noisy.noise, ScaledIdentity)
    w, d = torch.randn(6, 2, dtype=F64), positive(6)
    low_rank = _check(
        LowRankRootAddedDiagLinearOperator(LowRankRootLinearOperator(w), DiagLinearOperator(d)), AddedDiagonal
    )
    assert isinstance(low_rank.base, LowRank) and low_rank.base.factor is w
    _check(DiagLinearOperator(d), Diagonal)
    blocks = _check(BlockDiagLinearOperator(DenseLinearOperator(spd(3, 2, seed=3))), BlockDiag)
    assert blocks.num_blocks == 2
    scaled = _check(ConstantMulLinearOperator(DenseLinearOperator(a), torch.tensor(2.5, dtype=F64)), Dense)
    torch.testing.assert_close(scaled.to_dense(), 2.5 * a)


def test_structgp_adapter_unwraps_to_its_operator():
    op = Kronecker(spd(2, seed=4), spd(3, seed=5)) + ScaledIdentity(0.2, 6)
    unwrapped = as_operator(as_linear_operator(op), "covariance")
    assert isinstance(unwrapped, AddedDiagonal) and unwrapped.base.factors[0].matrix is op.base.factors[0].matrix
    expanded = as_operator(as_linear_operator(op, batch_shape=(2,)), "covariance")
    assert expanded.batch_shape == (2,) and isinstance(expanded, AddedDiagonal)


def test_other_linear_operators_are_dense_under_the_size_guard():
    f = torch.randn(5, 5, dtype=F64)
    _check(MatmulLinearOperator(DenseLinearOperator(f), DenseLinearOperator(f.mT.contiguous())), Dense)
    big = MatmulLinearOperator(
        DenseLinearOperator(torch.randn(300, 2, dtype=F64)), DenseLinearOperator(torch.randn(2, 300, dtype=F64))
    )
    with sg.settings(dense_limit=2**16), pytest.raises(DensifyError, match="covariance: a MatmulLinearOperator"):
        MultivariateNormal(torch.zeros(300, dtype=F64), big)
    with pytest.raises(
        TypeError, match="covariance: expected a structgp operator, a torch.Tensor or a linear_operator"
    ):
        MultivariateNormal(torch.zeros(3, dtype=F64), "not a covariance")
