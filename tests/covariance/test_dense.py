import pytest
import torch

from structgp.covariance import Dense, DensifyError
from structgp.inference import JitterWarning, NotPositiveDefiniteError, settings
from tests.reference import F64, check_against_dense, spd


@pytest.mark.parametrize("batch", [(), (3,), (2, 1)])
def test_dense_against_torch(batch):
    check_against_dense(Dense(spd(6, *batch)))


def test_dense_float32_within_float32_tolerance():
    a = spd(8, dtype=torch.float32)
    op = Dense(a)
    b = torch.randn(8)
    q, l = op.inv_quad_logdet(b)
    ref = torch.linalg.slogdet(a.double())[1]
    torch.testing.assert_close(l, ref.float(), rtol=1e-5, atol=1e-5)
    ref_q = b.double() @ torch.linalg.solve(a.double(), b.double())
    torch.testing.assert_close(q, ref_q.float(), rtol=1e-4, atol=1e-4)


def test_dense_gradcheck():
    a = spd(5).requires_grad_()
    b = torch.randn(5, dtype=F64, requires_grad=True)

    def f(a, b):
        a = (a + a.mT) / 2
        q, l = Dense(a).inv_quad_logdet(b)
        return q, l, Dense(a).solve(b)

    assert torch.autograd.gradcheck(f, (a, b))


def test_singular_psd_gets_warned_jitter():
    w = torch.randn(6, 2, dtype=F64)
    with pytest.warns(JitterWarning, match=r"added jitter [0-9.e-]+"):
        Dense(w @ w.mT).logdet()


def test_not_psd_raises_naming_the_matrix():
    a = -spd(4)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        Dense(a).logdet()


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (torch.randn(3, 4), ValueError, "square"),
        (torch.randn(3), ValueError, r"\(\.\.\., n, n\)"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "float32 or float64"),
        (torch.full((2, 2), float("nan")), ValueError, "finite"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_dense_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        Dense(bad)


def test_to_dense_guard():
    op = Dense(spd(50))
    with settings(dense_limit=1000), pytest.raises(DensifyError, match="dense_limit"):
        op.to_dense()


def test_matmul_shapes_and_errors():
    op = Dense(spd(4))
    assert (op @ torch.randn(4, dtype=F64)).shape == (4,)
    assert (op @ torch.randn(7, 4, 2, dtype=F64)).shape == (7, 4, 2)
    assert (torch.randn(3, 4, dtype=F64) @ op).shape == (3, 4)
    with pytest.raises(ValueError, match="rhs"):
        op @ torch.randn(5, dtype=F64)


def test_non_symmetric_matrix_is_rejected():
    a = spd(5)
    a[0, 1] += 0.1
    with pytest.raises(ValueError, match="matrix: expected a symmetric matrix"):
        Dense(a)
    Dense(spd(5, dtype=torch.float32))  # rounding-level asymmetry is accepted
