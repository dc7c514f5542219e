"""MultivariateNormal over structured covariances against torch.distributions and pyro (float64)."""

from __future__ import annotations

import math

import pyro.distributions as pdist
import pytest
import torch
import torch.distributions as tdist

import structgp as sg
from structgp.covariance import Dense, DensifyError, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import MultivariateNormal
from tests.reference import positive, spd

F64 = torch.float64


# Each case: (tensors, build(*tensors) -> operator). Builders are reused by gradcheck.
def _dense():
    return [spd(5, seed=1)], lambda m: Dense(m)


def _diagonal():
    return [positive(5)], lambda d: Diagonal(d)


def _low_rank_diag():
    return [torch.randn(6, 2, dtype=F64), positive(6)], lambda w, d: LowRank(w) + Diagonal(d)


def _kron_scaled():
    tensors = [spd(3, seed=2), spd(4, seed=3), torch.tensor(0.3, dtype=F64)]
    return tensors, lambda a, b, s: Kronecker(a, b) + ScaledIdentity(s, 12)


CASES = {"dense": _dense, "diagonal": _diagonal, "lowrank+diag": _low_rank_diag, "kron+scaled": _kron_scaled}


def _reference(op, loc):
    return tdist.MultivariateNormal(loc, covariance_matrix=op.to_dense().to(F64))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("case", CASES)
def test_log_prob_entropy_match_torch(case):
    tensors, build = CASES[case]()
    op = build(*tensors)
    loc = torch.randn(op.n, dtype=F64)
    dist, ref = MultivariateNormal(loc, op), _reference(op, loc)
    x = torch.randn(4, 3, op.n, dtype=F64)
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dist.entropy(), ref.entropy(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.variance, ref.variance)
    torch.testing.assert_close(dist.stddev, ref.stddev)
    torch.testing.assert_close(dist.covariance_matrix, ref.covariance_matrix)
    torch.testing.assert_close(dist.scale_tril, ref.scale_tril)
    torch.testing.assert_close(dist.precision_matrix, ref.precision_matrix, rtol=1e-9, atol=1e-9)
    assert dist.mean is dist.loc and dist.mode is dist.loc


def test_low_rank_matches_pyro_low_rank_mvn():
    w, d = torch.randn(3, 7, 2, dtype=F64), positive(3, 7)
    loc = torch.randn(3, 7, dtype=F64)
    dist = MultivariateNormal(loc, LowRank(w) + Diagonal(d))
    ref = pdist.LowRankMultivariateNormal(loc, w, d)
    x = torch.randn(5, 3, 7, dtype=F64)
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.entropy(), ref.entropy(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.variance, ref.variance)
    assert sg.plan(dist.covariance).method == "woodbury"


def test_diagonal_matches_independent_normal():
    d, loc = positive(2, 6), torch.randn(2, 6, dtype=F64)
    dist = MultivariateNormal(loc, Diagonal(d))
    ref = tdist.Independent(tdist.Normal(loc, d.sqrt()), 1)
    x = torch.randn(3, 2, 6, dtype=F64)
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.entropy(), ref.entropy())


@pytest.mark.parametrize("case", CASES)
def test_rsample_moments(case):
    """Whitened draws L^{-1} (x - loc) are N(0, I): mean within 5 standard errors, covariance within 5."""
    tensors, build = CASES[case]()
    op = build(*tensors)
    loc = torch.randn(op.n, dtype=F64)
    num = 20000
    x = MultivariateNormal(loc, op).rsample((num,))
    assert x.shape == (num, op.n)
    chol = torch.linalg.cholesky(op.to_dense())
    z = torch.linalg.solve_triangular(chol, (x - loc).T, upper=False).T
    assert z.mean(0).abs().max() < 5 / math.sqrt(num)
    cov = z.T @ z / num
    assert (cov - torch.eye(op.n, dtype=F64)).abs().max() < 5 * math.sqrt(2 / num)


def test_rsample_batch_members_are_independent():
    """An expanded distribution (shared covariance) draws independently per batch member."""
    op = Kronecker(spd(2, seed=4), spd(3, seed=5)) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 6)
    dist = MultivariateNormal(torch.zeros(6, dtype=F64), op).expand((2,))
    x = dist.rsample((20000,))
    assert x.shape == (20000, 2, 6)
    chol = torch.linalg.cholesky(op.to_dense())
    z = torch.linalg.solve_triangular(chol, x.unsqueeze(-1), upper=False).squeeze(-1)
    cross = z[:, 0].T @ z[:, 1] / x.shape[0]
    assert cross.abs().max() < 5 * math.sqrt(1 / x.shape[0])
    assert (z[:, 0].T @ z[:, 0] / x.shape[0] - torch.eye(6, dtype=F64)).abs().max() < 0.05


def test_batch_shapes_broadcast():
    loc = torch.randn(4, 1, 5, dtype=F64)
    op = Dense(spd(5, 3))
    dist = MultivariateNormal(loc, op)
    assert dist.batch_shape == (4, 3) and dist.event_shape == (5,)
    assert dist.rsample((2,)).shape == (2, 4, 3, 5)
    assert dist.sample().shape == (4, 3, 5)
    assert dist.entropy().shape == (4, 3) and dist.variance.shape == (4, 3, 5)
    assert dist.covariance_matrix.shape == (4, 3, 5, 5)
    x = torch.randn(2, 4, 3, 5, dtype=F64)
    ref = tdist.MultivariateNormal(loc, op.to_dense())
    torch.testing.assert_close(dist.log_prob(x), ref.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dist.log_prob(x[0, 0, 0]), ref.log_prob(x[0, 0, 0]), rtol=1e-10, atol=1e-10)


def test_kronecker_factor_batches_broadcast():
    op = Kronecker(spd(2, 3, seed=6), spd(3, seed=7))
    loc = torch.randn(6, dtype=F64)
    dist = MultivariateNormal(loc, op)
    assert dist.batch_shape == (3,)
    x = torch.randn(4, 3, 6, dtype=F64)
    torch.testing.assert_close(dist.log_prob(x), _reference(op, loc).log_prob(x), rtol=1e-10, atol=1e-10)
    assert dist.rsample((4,)).shape == (4, 3, 6)


def test_expand_shares_the_covariance():
    op = LowRank(torch.randn(5, 2, dtype=F64)) + Diagonal(positive(5))
    dist = MultivariateNormal(torch.randn(5, dtype=F64), op)
    big = dist.expand(torch.Size([3, 2]))
    assert big.batch_shape == (3, 2) and big.loc.shape == (3, 2, 5)
    assert big._unbroadcasted_covariance is op
    assert big.covariance.batch_shape == (3, 2)
    x = torch.randn(7, 3, 2, 5, dtype=F64)
    torch.testing.assert_close(big.log_prob(x), dist.log_prob(x))
    torch.testing.assert_close(big.entropy(), dist.entropy().expand(3, 2))
    assert big.rsample((7,)).shape == (7, 3, 2, 5)
    assert dist.expand_by([4]).batch_shape == (4,)
    with pytest.raises(ValueError, match="batch_shape"):
        big.expand((3, 4))


def test_structured_paths_do_not_densify():
    """Under a dense limit below one n x n matrix, the structured covariances still answer."""
    op = LowRank(torch.randn(40, 3, dtype=F64)) + Diagonal(positive(40))
    dist = MultivariateNormal(torch.zeros(40, dtype=F64), op)
    kron = MultivariateNormal(
        torch.zeros(40, dtype=F64), Kronecker(spd(5, seed=8), spd(8, seed=9)) + ScaledIdentity(0.2, 40)
    )
    with sg.settings(dense_limit=40 * 40 * 8 - 1):
        assert torch.isfinite(dist.log_prob(torch.randn(3, 40, dtype=F64))).all()
        assert torch.isfinite(dist.entropy())
        assert dist.rsample((3,)).shape == (3, 40)
        assert kron.rsample((3,)).shape == (3, 40) and kron.variance.shape == (40,)
        with pytest.raises(DensifyError):
            dist.covariance_matrix  # noqa: B018


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_tensor(case):
    """log_prob, rsample (fixed noise) and entropy are differentiable in loc, value and every tensor."""
    tensors, build = CASES[case]()
    n = build(*tensors).n
    loc, value = torch.randn(n, dtype=F64), torch.randn(2, n, dtype=F64)
    inputs = [t.clone().requires_grad_() for t in (loc, value, *tensors)]

    def log_prob(loc, value, *ts):
        return MultivariateNormal(loc, build(*ts)).log_prob(value)

    def rsample(loc, value, *ts):
        torch.manual_seed(1)
        return MultivariateNormal(loc, build(*ts)).rsample((2,))

    def entropy(loc, value, *ts):
        return MultivariateNormal(loc, build(*ts)).entropy()

    for fn in (log_prob, rsample, entropy):
        assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5, fast_mode=True)
    out = log_prob(*inputs).sum() + rsample(*inputs).sum()
    grads = torch.autograd.grad(out, inputs)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", ["lowrank+diag", "kron+scaled"])
def test_float32(case):
    tensors, build = CASES[case]()
    op32 = build(*(t.float() for t in tensors))
    loc = torch.randn(op32.n)
    dist = MultivariateNormal(loc, op32)
    x = torch.randn(3, op32.n)
    ref = _reference(build(*tensors), loc.double())
    assert dist.log_prob(x).dtype == torch.float32
    torch.testing.assert_close(dist.log_prob(x).double(), ref.log_prob(x.double()), rtol=1e-4, atol=1e-4)
    assert dist.rsample((2,)).dtype == torch.float32


def test_tensor_covariance_is_wrapped_dense():
    cov = spd(4, seed=10)
    dist = MultivariateNormal(torch.zeros(4, dtype=F64), cov)
    assert isinstance(dist.covariance, Dense)
    x = torch.randn(4, dtype=F64)
    torch.testing.assert_close(
        dist.log_prob(x), tdist.MultivariateNormal(torch.zeros(4, dtype=F64), cov).log_prob(x)
    )


def test_validation_errors():
    op = Dense(spd(3, seed=11))
    with pytest.raises(ValueError, match="loc: expected shape"):
        MultivariateNormal(torch.zeros(4, dtype=F64), op)
    with pytest.raises(TypeError, match="loc: expected dtype"):
        MultivariateNormal(torch.zeros(3), op)
    with pytest.raises(TypeError, match="loc"):
        MultivariateNormal([0.0, 0.0, 0.0], op)
    with pytest.raises(TypeError, match="covariance"):
        MultivariateNormal(torch.zeros(3, dtype=F64), "not an operator")
    with pytest.raises(ValueError, match="batch shapes"):
        MultivariateNormal(torch.zeros(2, 3, dtype=F64), Dense(spd(3, 4)))
    with pytest.raises(ValueError, match="loc"):
        MultivariateNormal(torch.tensor([0.0, math.nan, 0.0], dtype=F64), op, validate_args=True)
    bad = LowRank(torch.zeros(3, 1, dtype=F64))  # zero diagonal: not positive definite
    with pytest.raises(ValueError, match="covariance: expected a positive definite"):
        MultivariateNormal(torch.zeros(3, dtype=F64), bad, validate_args=True)
    dist = MultivariateNormal(torch.zeros(3, dtype=F64), op, validate_args=True)
    with pytest.raises(ValueError):
        dist.log_prob(torch.zeros(4, dtype=F64))
    with pytest.raises(TypeError, match="value: expected a tensor of dtype"):
        dist.log_prob(torch.zeros(3, dtype=torch.float32))


def test_api_surface():
    dist = MultivariateNormal(torch.zeros(3, dtype=F64), Diagonal(positive(3)))
    assert dist.has_rsample and dist.support is tdist.constraints.real_vector
    assert set(dist.arg_constraints) == {"loc"}
    assert "Diagonal" in repr(dist)
    assert isinstance(dist, pdist.TorchDistribution)
    assert dist.to_event(0).event_shape == (3,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(case):
    tensors, build = CASES[case]()
    loc = torch.randn(build(*tensors).n, dtype=F64)
    cpu = MultivariateNormal(loc, build(*tensors))
    gpu = MultivariateNormal(loc.cuda(), build(*(t.cuda() for t in tensors)))
    x = torch.randn(3, loc.shape[0], dtype=F64)
    torch.testing.assert_close(gpu.log_prob(x.cuda()).cpu(), cpu.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu.entropy().cpu(), cpu.entropy())
    draws = gpu.rsample((5,))
    assert draws.device == loc.cuda().device and draws.shape == (5, loc.shape[0])
