import pytest
import torch

from structgp.covariance import Dense, LowRank
from structgp.models import PosteriorCovariance
from tests.reference import F64, assert_close, check_against_dense, spd


def _schur(n=5, m=7, batch=()):
    """``K_** - C A^{-1} C^T`` from a random SPD joint matrix (a Schur complement: SPD)."""
    joint = spd(n + m, *batch, seed=0)
    prior, cross, a = joint[..., :n, :n], joint[..., :n, n:], joint[..., n:, n:]
    right = torch.linalg.solve(a, cross.mT).mT
    return prior, cross, right, prior - cross @ torch.linalg.solve(a, cross.mT)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_against_dense(batch):
    prior, left, right, expected = _schur(batch=batch)
    op = PosteriorCovariance(Dense((prior + prior.mT) / 2), left, right)
    assert op.shape == expected.shape
    assert_close(op.to_dense(), expected, 1e-10, 1e-10)
    check_against_dense(op, rtol=1e-8, atol=1e-8)


def test_scale_expand_and_structured_prior():
    prior, left, right, expected = _schur()
    op = PosteriorCovariance(Dense((prior + prior.mT) / 2), left, right)
    assert_close((2.5 * op).to_dense(), 2.5 * expected, 1e-10, 1e-10)
    assert op.expand(3).shape == (3, 5, 5)
    assert_close(op.expand(3).diagonal(), expected.diagonal().expand(3, 5), 1e-10, 1e-10)
    w = torch.randn(5, 3, dtype=F64)
    low = PosteriorCovariance(LowRank(w), 0.5 * w, w)  # w w^T - w w^T / 2
    assert_close(low.to_dense(), 0.5 * w @ w.mT, 1e-12, 1e-12)


def test_bad_arguments():
    with pytest.raises(TypeError, match="prior: expected a structgp operator"):
        PosteriorCovariance(torch.eye(3), torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="left: expected a tensor"):
        PosteriorCovariance(Dense(torch.eye(3)), torch.ones(2, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="right: expected 1 columns"):
        PosteriorCovariance(Dense(torch.eye(3)), torch.ones(3, 1), torch.ones(3, 2))
