import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structgp as sg
from structgp.covariance import Diagonal, LowRank, ScaledIdentity
from tests.reference import F64, check_against_dense, dense_inv_quad_logdet, positive


@pytest.mark.parametrize("noise", ["diag", "scaled"])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_low_rank_plus_noise_against_torch(noise, batch):
    w = torch.randn(*batch, 9, 3, dtype=F64)
    d = Diagonal(positive(*batch, 9)) if noise == "diag" else ScaledIdentity(positive(*batch), 9)
    op = LowRank(w) + d
    assert sg.plan(op).method == "woodbury"
    check_against_dense(op)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 6),
    wb=st.sampled_from([(), (1,), (2, 1)]),
    db=st.sampled_from([(), (3,), (1, 3)]),
)
def test_broadcast_batches(n, k, wb, db):
    op = LowRank(torch.randn(*wb, n, k, dtype=F64)) + Diagonal(positive(*db, n))
    assert op.batch_shape == torch.broadcast_shapes(wb, db)
    check_against_dense(op, rtol=1e-7, atol=1e-7)


def test_gradcheck_woodbury():
    w = torch.randn(7, 2, dtype=F64, requires_grad=True)
    d = positive(7).requires_grad_()
    b = torch.randn(7, dtype=F64, requires_grad=True)

    def f(w, d, b):
        op = LowRank(w) + Diagonal(d)
        q, l = op.inv_quad_logdet(b)
        return q, l, op.solve(b)

    assert torch.autograd.gradcheck(f, (w, d, b))


def test_gradients_match_dense_autograd():
    w = torch.randn(2, 8, 3, dtype=F64, requires_grad=True)
    s = positive(2).requires_grad_()
    b = torch.randn(2, 8, dtype=F64)
    q, l = (LowRank(w) + ScaledIdentity(s, 8)).inv_quad_logdet(b)
    g = torch.autograd.grad((q + l).sum(), (w, s))
    a = w @ w.mT + s[:, None, None] * torch.eye(8, dtype=F64)
    rq, rl = dense_inv_quad_logdet(a, b)
    rg = torch.autograd.grad((rq + rl).sum(), (w, s))
    for x, y in zip(g, rg):
        torch.testing.assert_close(x, y)


def test_float32_large_n_matches_float64():
    torch.manual_seed(0)
    w = torch.randn(20_000, 16) / 4
    d = torch.rand(20_000) + 0.5
    b = torch.randn(20_000)
    q32, l32 = (LowRank(w) + Diagonal(d)).inv_quad_logdet(b)
    q64, l64 = (LowRank(w.double()) + Diagonal(d.double())).inv_quad_logdet(b.double())
    torch.testing.assert_close(q32.double(), q64, rtol=1e-5, atol=0)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=0)


def test_low_rank_alone_is_singular():
    op = LowRank(torch.randn(6, 2, dtype=F64))
    with pytest.raises(ValueError, match="singular.*add noise"):
        op.logdet()
    r = op.root().to_dense()
    torch.testing.assert_close(r @ r.mT, op.to_dense())


def test_low_rank_sum_stays_low_rank():
    a, b = torch.randn(5, 2, dtype=F64), torch.randn(5, 3, dtype=F64)
    op = LowRank(a) + LowRank(b)
    assert isinstance(op, LowRank) and op.rank == 5
    torch.testing.assert_close(op.to_dense(), a @ a.T + b @ b.T)


def test_bad_factor():
    with pytest.raises(ValueError, match=r"factor: expected shape \(\.\.\., n, k\)"):
        LowRank(torch.randn(4))
    with pytest.raises(ValueError, match="factor: expected finite"):
        LowRank(torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="noise|dtype"):
        LowRank(torch.randn(4, 2)) + Diagonal(positive(4))
