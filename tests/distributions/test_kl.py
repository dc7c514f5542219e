"""``kl_divergence`` between structgp MultivariateNormals against torch's MVN KL on the dense matrices."""

from __future__ import annotations

import pyro.distributions as pdist
import pytest
import torch
import torch.distributions as tdist

import structgp as sg
from structgp.covariance import BlockDiag, Dense, Diagonal, Kronecker, LowRank, ScaledIdentity, SparseLifted, Sum
from structgp.distributions import MultivariateNormal
from tests.reference import F64, positive, spd

N = 6


def _lift() -> torch.Tensor:
    lift = torch.zeros(N, 3, dtype=F64)
    rows = torch.arange(N)
    lift[rows, rows % 3] = 0.8
    lift[rows, (rows + 1) % 3] = 0.3
    return lift.to_sparse_csr()


COVARIANCES = {
    "dense": lambda: Dense(spd(N, seed=1)),
    "diagonal": lambda: Diagonal(positive(N)),
    "lowrank+diag": lambda: LowRank(torch.randn(N, 2, dtype=F64)) + Diagonal(positive(N)),
    "kron+scaled": lambda: Kronecker(spd(2, seed=2), spd(3, seed=3)) + ScaledIdentity(0.2, N),
    "blockdiag+diag": lambda: BlockDiag([spd(2, seed=4), spd(3, seed=5), spd(1, seed=6)]) + Diagonal(positive(N)),
    "lifted+diag": lambda: SparseLifted(_lift(), Dense(spd(3, seed=7))) + Diagonal(positive(N)),
    "sum (root wider than n)": lambda: Dense(spd(N, seed=8)) + Kronecker(spd(2, seed=9), spd(3, seed=10)),
}
NAMES = list(COVARIANCES)
PAIRS = [(a, b) for i, a in enumerate(NAMES) for b in (NAMES[(i + 1) % len(NAMES)], NAMES[(i + 3) % len(NAMES)])]


def _torch(d: MultivariateNormal) -> tdist.MultivariateNormal:
    return tdist.MultivariateNormal(d.loc, d._unbroadcasted_covariance.to_dense())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("p_name", "q_name"), PAIRS)
def test_kl_matches_torch_on_the_dense_matrices(p_name, q_name):
    p = MultivariateNormal(torch.randn(N, dtype=F64), COVARIANCES[p_name]())
    q = MultivariateNormal(torch.randn(N, dtype=F64), COVARIANCES[q_name]())
    value = tdist.kl_divergence(p, q)
    torch.testing.assert_close(value, tdist.kl_divergence(_torch(p), _torch(q)), rtol=1e-10, atol=1e-10)
    assert value.shape == ()


def test_sum_covariance_takes_the_dense_factor_for_the_trace():
    sp = COVARIANCES["sum (root wider than n)"]()
    assert isinstance(sp, Sum) and sp.root().shape[-1] > N  # the path the test above exercised


def test_batches_broadcast_like_torch():
    """p: loc (2, 1, n) with an unbatched covariance; q: loc (3, n) with a batched (3, n, n) covariance."""
    p = MultivariateNormal(torch.randn(2, 1, N, dtype=F64), COVARIANCES["lowrank+diag"]())
    q = MultivariateNormal(torch.randn(3, N, dtype=F64), Dense(spd(N, 3, seed=11)) + Diagonal(positive(N)))
    value = tdist.kl_divergence(p, q)
    assert value.shape == (2, 3)
    torch.testing.assert_close(value, tdist.kl_divergence(_torch(p), _torch(q)), rtol=1e-10, atol=1e-10)
    back = tdist.kl_divergence(q, p)
    torch.testing.assert_close(back, tdist.kl_divergence(_torch(q), _torch(p)), rtol=1e-10, atol=1e-10)
    expanded = tdist.kl_divergence(p.expand((2, 3)), q)  # an expanded distribution shares its covariance
    torch.testing.assert_close(expanded, value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("p_cov", "q_cov"),
    [((1,), ()), ((), (1,)), ((2, 1), (3,))],
    ids=["p_cov_batch_1", "q_cov_batch_1", "cov_batches_2x1_3"],
)
def test_covariance_batches_broadcast(p_cov, q_cov):
    p = MultivariateNormal(torch.randn(3, N, dtype=F64), Dense(spd(N, *p_cov, seed=15)))
    q = MultivariateNormal(torch.randn(N, dtype=F64), Dense(spd(N, *q_cov, seed=16)) + Diagonal(positive(N)))
    for a, b in ((p, q), (q, p)):
        torch.testing.assert_close(tdist.kl_divergence(a, b), tdist.kl_divergence(_torch(a), _torch(b)))


def test_gradients_match_torch():
    w, d = torch.randn(N, 2, dtype=F64), positive(N)
    a, b, s = spd(2, seed=12), spd(3, seed=13), torch.tensor(0.3, dtype=F64)
    m_p, m_q = torch.randn(N, dtype=F64), torch.randn(N, dtype=F64)

    def kl(structured, w, d, a, b, s, m_p, m_q):
        sp, sq = LowRank(w) + Diagonal(d), Kronecker(a, b) + ScaledIdentity(s, N)
        if structured:
            return tdist.kl_divergence(MultivariateNormal(m_p, sp), MultivariateNormal(m_q, sq))
        return tdist.kl_divergence(
            tdist.MultivariateNormal(m_p, w @ w.T + torch.diag(d)),
            tdist.MultivariateNormal(m_q, torch.kron(a, b) + s * torch.eye(N, dtype=F64)),
        )

    leaves = (w, d, a, b, s, m_p, m_q)
    grads = []
    for structured in (True, False):
        inputs = [t.clone().requires_grad_() for t in leaves]
        grads.append(torch.autograd.grad(kl(structured, *inputs), inputs))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_one_covariance_and_identical_distributions():
    cov = COVARIANCES["kron+scaled"]()
    loc = torch.randn(N, dtype=F64)
    p, q = MultivariateNormal(loc, cov), MultivariateNormal(loc + 1, cov)
    torch.testing.assert_close(tdist.kl_divergence(p, q), tdist.kl_divergence(_torch(p), _torch(q)))
    torch.testing.assert_close(tdist.kl_divergence(p, p), torch.zeros((), dtype=F64), rtol=0, atol=1e-12)


def test_mixed_with_torch_and_pyro_multivariate_normals():
    p = MultivariateNormal(torch.randn(N, dtype=F64), COVARIANCES["lowrank+diag"]())
    dense = spd(N, seed=14)
    for other in (
        tdist.MultivariateNormal(torch.zeros(N, dtype=F64), dense),
        pdist.MultivariateNormal(torch.zeros(N, dtype=F64), dense),
    ):
        torch.testing.assert_close(tdist.kl_divergence(p, other), tdist.kl_divergence(_torch(p), other))
        torch.testing.assert_close(tdist.kl_divergence(other, p), tdist.kl_divergence(other, _torch(p)))


def test_refuses_mismatched_sizes_and_dtypes():
    p = MultivariateNormal(torch.zeros(N, dtype=F64), Diagonal(positive(N)))
    with pytest.raises(ValueError, match="event shape"):
        tdist.kl_divergence(p, MultivariateNormal(torch.zeros(N + 1, dtype=F64), Diagonal(positive(N + 1))))
    with pytest.raises(TypeError, match="dtype"):
        tdist.kl_divergence(p, MultivariateNormal(torch.zeros(N), Diagonal(positive(N).float())))


def test_structured_factorisation_of_q():
    """The trace and Mahalanobis terms go through one structured solve with S_q (Woodbury here)."""
    p = MultivariateNormal(torch.zeros(40, dtype=F64), Diagonal(positive(40)))
    q = MultivariateNormal(torch.ones(40, dtype=F64), LowRank(torch.randn(40, 3, dtype=F64)) + Diagonal(positive(40)))
    with sg.settings(dense_limit=40 * 40 * 8 - 1):  # neither covariance may be densified
        value = tdist.kl_divergence(p, q)
    torch.testing.assert_close(value, tdist.kl_divergence(_torch(p), _torch(q)), rtol=1e-10, atol=1e-10)
