import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel

from structgp.covariance import SparseLifted
from structgp.kernels import AggregationKernel
from structgp.kernels.aggregation import take_rows
from tests.reference import F64, assert_close


def _setup():
    axes = [torch.linspace(0, 1, 5, dtype=F64), torch.linspace(0, 2, 4, dtype=F64)]
    ks = [RBFKernel().double(), MaternKernel(nu=0.5).double()]
    ks[0].lengthscale, ks[1].lengthscale = 0.4, 1.1
    latent = torch.kron(ks[0](axes[0][:, None]).to_dense(), ks[1](axes[1][:, None]).to_dense())
    return AggregationKernel(ks, axes), latent


def _weights(n, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 20, dtype=F64, generator=gen)
    return a * (a > 0.6)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_covariance_is_a_k_at(layout):
    kernel, latent = _setup()
    a, at = _weights(7, 0), _weights(3, 1)
    convert = {"dense": lambda t: t, "coo": lambda t: t.to_sparse(), "csr": lambda t: t.to_sparse_csr()}[layout]
    x, xt = convert(a), convert(at)
    op = kernel(kernel.check_inputs(x))
    assert isinstance(op, SparseLifted)
    assert_close(op.to_dense(), a @ latent @ a.mT, 1e-12, 1e-12)
    assert_close(kernel(x).to_dense(), a @ latent @ a.mT, 1e-12, 1e-12)  # remembered lift, fresh base
    assert_close(kernel.cross(xt, x), at @ latent @ a.mT, 1e-12, 1e-12)
    assert_close(kernel.prior_diagonal(xt), (at @ latent @ at.mT).diagonal(), 1e-12, 1e-12)
    assert_close(kernel.prior(xt).to_dense(), at @ latent @ at.mT, 1e-12, 1e-12)


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_take_rows(layout):
    a = _weights(9, 2)
    x = {"dense": a, "coo": a.to_sparse(), "csr": a.to_sparse_csr()}[layout]
    assert_close(take_rows(x, 2, 6).to_dense(), a[2:6], 0, 0)
    assert_close(take_rows(x, 8, 9).to_dense(), a[8:9], 0, 0)


def test_bad_weights():
    kernel, _ = _setup()
    with pytest.raises(ValueError, match=r"x: expected a non-empty weight matrix \(n, 20\)"):
        kernel.check_inputs(torch.rand(3, 19, dtype=F64))
    with pytest.raises(ValueError, match="finite weights"):
        kernel.check_inputs(torch.full((2, 20), float("nan"), dtype=F64).to_sparse())
    with pytest.raises(TypeError, match="weight matrix"):
        kernel.check_inputs([[0.0] * 20])
