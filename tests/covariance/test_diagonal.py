import pytest
import torch

from structgp.covariance import Diagonal, ScaledIdentity
from tests.reference import F64, check_against_dense, positive


@pytest.mark.parametrize("batch", [(), (3,)])
def test_diagonal_against_torch(batch):
    check_against_dense(Diagonal(positive(*batch, 7)))


@pytest.mark.parametrize("batch", [(), (2,)])
def test_scaled_identity_against_torch(batch):
    check_against_dense(ScaledIdentity(positive(*batch), 5))


def test_scaled_identity_accepts_python_float():
    op = ScaledIdentity(0.5, 3)
    assert op.shape == (3, 3) and op.dtype == torch.get_default_dtype()


def test_gradcheck_diagonal_and_identity():
    d = positive(4).requires_grad_()
    s = positive().requires_grad_()
    b = torch.randn(4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, b: Diagonal(d).inv_quad_logdet(b), (d, b))
    assert torch.autograd.gradcheck(lambda s, b: ScaledIdentity(s, 4).inv_quad_logdet(b), (s, b))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Diagonal(torch.tensor([1.0, 0.0])), ValueError, "diag: expected strictly positive"),
        (lambda: Diagonal(torch.tensor([1.0, float("inf")])), ValueError, "diag: expected finite"),
        (lambda: Diagonal(torch.tensor(1.0)), ValueError, r"diag: expected shape \(\.\.\., n\)"),
        (lambda: ScaledIdentity(torch.tensor(-1.0), 3), ValueError, "scale: expected strictly positive"),
        (lambda: ScaledIdentity(1.0, 0), ValueError, "n: expected a positive int"),
    ],
)
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
