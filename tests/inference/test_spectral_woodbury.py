import warnings

import pytest
import torch

import structgp as sg
from structgp.covariance import Diagonal, Kronecker, ScaledIdentity
from structgp.inference.spectral_woodbury import SpectralWoodbury
from tests.reference import F64, assert_close, dense_inv_quad_logdet, paired_grads, positive, spd


def rbf(n: int, lengthscale) -> torch.Tensor:
    """An RBF Gram matrix on ``n`` points of [0, 1] (singular in float64 for these lengthscales)."""
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / torch.as_tensor(lengthscale, dtype=F64) ** 2)


N = 16 * 12 * 10
LS = [0.6, 0.5, 0.7]


def smooth_grid(ls, sizes=(16, 12, 10)) -> Kronecker:
    return Kronecker(*(rbf(n, s) for n, s in zip(sizes, ls)))


@pytest.fixture(autouse=True)
def _woodbury():
    """The method under test (at these small sizes the cost model may prefer the dense Cholesky)."""
    with sg.settings(method="woodbury"):
        yield


@pytest.mark.parametrize("noise_batch", [(), (2,)])
def test_against_dense_without_jitter(noise_batch):
    op = smooth_grid(LS) + Diagonal(positive(*noise_batch, N, low=0.02))
    y = torch.randn(*noise_batch, N, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no JitterWarning
        q, ld = op.inv_quad_logdet(y)
        x = op.solve(y.unsqueeze(-1))
    plan = sg.plan(op)  # the rank is a fact the engine found (planning computes nothing)
    assert plan.method == "woodbury" and "spectral root of rank" in plan.reason
    a = op.to_dense()
    ref_q, ref_ld = dense_inv_quad_logdet(a, y)
    assert_close(q, ref_q, rtol=1e-10, atol=1e-9)
    assert_close(ld, ref_ld, rtol=1e-11, atol=1e-9)
    assert_close(x, torch.linalg.solve(a, y.unsqueeze(-1)), rtol=1e-9, atol=1e-9)
    assert "row form" in str(sg.last_report())


def test_gradients_match_dense_autograd():
    leaves = {"ls": torch.tensor(LS, dtype=F64), "d": positive(N, low=0.02)}
    leaves["y"] = torch.randn(N, dtype=F64)

    def loss(structured: bool, ls, d, y):
        op = smooth_grid(ls) + Diagonal(d)
        if structured:
            q, ld = op.inv_quad_logdet(y)
            x = op.solve(y)
            assert sg.last_report().method == "woodbury"
        else:
            a = op.to_dense()
            q, ld = dense_inv_quad_logdet(a, y)
            x = torch.linalg.solve(a, y)
        return q + ld + x.square().sum()

    for name, g, ref in paired_grads(loss, leaves):
        assert torch.isfinite(g).all(), name
        assert_close(g, ref, rtol=1e-7, atol=1e-8)


def test_float32_within_float32_accuracy():
    op64 = smooth_grid(LS) + Diagonal(positive(N, low=0.02))
    op32 = op64.to(torch.float32)
    y = torch.randn(N, dtype=F64)
    q, ld = op32.inv_quad_logdet(y.float())
    assert sg.last_report().method == "woodbury"
    ref_q, ref_ld = dense_inv_quad_logdet(op64.to_dense(), y)
    assert_close(q.double(), ref_q, rtol=1e-4, atol=0)
    assert_close(ld.double(), ref_ld, rtol=1e-4, atol=0)


def test_second_derivatives_refused():
    ls = torch.tensor(LS, dtype=F64, requires_grad=True)
    op = smooth_grid(ls) + Diagonal(positive(N, low=0.02))
    q, ld = op.inv_quad_logdet(torch.randn(N, dtype=F64))
    with pytest.raises(RuntimeError, match="spectral root.*method='cholesky'"):
        torch.autograd.grad(q + ld, ls, create_graph=True)


def test_applies_only_to_singular_kronecker_plus_plain_diagonal_noise():
    engine = SpectralWoodbury()
    # planning reads only metadata and cached facts: whether the grid is singular is known once the engine
    # has settled it (computing the factor roots); then a Cholesky-able grid is not this engine's
    regular = (Kronecker(spd(10), spd(8)), Kronecker(rbf(10, 0.5), rbf(8, 0.4)))
    for op in (k + Diagonal(positive(80)) for k in regular):
        assert engine.applies(op) is not None and not engine.settle(op)
        assert engine.applies(op) is None  # Cholesky-able factors, nor singular
    k = smooth_grid(LS)
    assert engine.applies(k + ScaledIdentity(torch.tensor(0.1, dtype=F64), N)) is None  # per-factor eigen
    noise = Kronecker(Diagonal(positive(16)), Diagonal(positive(12)), Diagonal(positive(10)))
    assert engine.applies(k + noise) is None  # symmetrised eigen
    assert engine.applies(k + Diagonal(positive(N))) is not None


def test_auto_prefers_it_over_the_dense_cholesky_when_the_rank_is_low():
    op = smooth_grid([1.0, 1.0, 1.0], sizes=(20, 16, 12)) + Diagonal(positive(3840, low=0.02))
    with sg.settings(method="auto"):
        plan = sg.plan(op)
    assert plan.method == "woodbury", plan
    assert plan.cost.flops < next(o.cost.flops for o in plan.alternatives if o.method == "cholesky")
