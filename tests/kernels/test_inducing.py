import warnings

import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

from structgp.covariance import AddedDiagonal, Dense, LowRank
from structgp.kernels import InducingPointKernel
from tests.reference import F64, assert_close


def _base():
    k = ScaleKernel(RBFKernel()).double()
    k.outputscale, k.base_kernel.lengthscale = 1.3, 0.4
    return k


def _nystrom(k, z, x1, x2):
    return k(x1, z).to_dense() @ torch.linalg.solve(k(z).to_dense(), k(z, x2).to_dense())


@pytest.mark.parametrize("method", ["sor", "dtc", "fitc"])
def test_training_covariance(method):
    k, z = _base(), torch.rand(5, 2, dtype=F64)
    x = torch.rand(12, 2, dtype=F64)
    kernel = InducingPointKernel(k, z, method=method)
    op = kernel(x)
    q = _nystrom(k, z, x, x)
    if method == "fitc":
        assert isinstance(op, AddedDiagonal) and isinstance(op.base, LowRank)
        ref = q + torch.diag(k(x).to_dense().diagonal() - q.diagonal())
    else:
        assert isinstance(op, LowRank) and op.rank == 5
        ref = q
    assert_close(op.to_dense(), ref, 1e-10, 1e-10)


@pytest.mark.parametrize("method", ["sor", "dtc", "fitc"])
def test_prediction_pieces(method):
    k, z = _base(), torch.rand(4, 2, dtype=F64)
    x, xt = torch.rand(10, 2, dtype=F64), torch.rand(3, 2, dtype=F64)
    kernel = InducingPointKernel(k, z, method=method)
    f, ft = kernel.cross_factor(x), kernel.cross_factor(xt)
    assert_close(ft @ f.mT, _nystrom(k, z, xt, x), 1e-10, 1e-10)
    assert_close(kernel.cross(xt, x), _nystrom(k, z, xt, x), 1e-10, 1e-10)
    prior = _nystrom(k, z, xt, xt) if method == "sor" else k(xt).to_dense()
    assert_close(kernel.prior(xt).to_dense(), prior, 1e-10, 1e-10)
    assert_close(kernel.prior_diagonal(xt), prior.diagonal(), 1e-10, 1e-10)
    assert isinstance(kernel.prior(xt), LowRank if method == "sor" else Dense)


@pytest.mark.parametrize("seed", [0, 7])  # seed 7 once failed when K_xz was evaluated in float32
def test_float32_data_factorises_k_zz_in_float64(seed):
    torch.manual_seed(seed)
    k = RBFKernel()
    k.lengthscale = 0.3
    z = torch.linspace(0, 1, 12)[:, None]  # K_zz is indefinite when rounded to float32
    assert torch.linalg.cholesky_ex(k(z).to_dense().double()).info > 0
    kernel = InducingPointKernel(k, z)
    x = torch.rand(8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no jitter needed
        f = kernel.cross_factor(x)
    assert f.dtype == torch.float32
    k64 = RBFKernel().double()
    k64.lengthscale = 0.3
    ref = _nystrom(k64, z.double(), x.double(), x.double())
    assert_close(f.double() @ f.double().mT, ref, 1e-5, 1e-5)


def test_inducing_points_are_learned_and_differentiable():
    k, z = _base(), torch.rand(3, 2, dtype=F64)
    kernel = InducingPointKernel(k, z)
    assert isinstance(kernel.inducing_points, torch.nn.Parameter)
    fixed = InducingPointKernel(k, z, learn_inducing_points=False)
    assert not isinstance(fixed.inducing_points, torch.nn.Parameter)
    x = torch.rand(6, 2, dtype=F64)
    noise = 0.1 * torch.eye(6, dtype=F64)
    op = kernel(x) + Dense(noise)
    (g,) = torch.autograd.grad(op.logdet(), kernel.inducing_points)
    zz = z.clone().requires_grad_()
    (ref,) = torch.autograd.grad(torch.logdet(_nystrom(k, zz, x, x) + noise), zz)
    assert_close(g, ref, 1e-8, 1e-8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method: expected one of"):
        InducingPointKernel(RBFKernel(), torch.rand(3, 1), method="svgp")
    kernel = InducingPointKernel(RBFKernel(), torch.rand(3, 2))
    with pytest.raises(ValueError, match="expected 2 columns"):
        kernel.check_inputs(torch.rand(4, 3))
