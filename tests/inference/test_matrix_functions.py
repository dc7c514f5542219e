"""A^{1/2} x and A^{-1/2} x: checked by squaring against dense float64 torch (R R x = A x, W W x = A^{-1} x)."""

import pytest
import torch
from torch.func import vmap

from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.inference import matrix_functions as mf
from structgp.inference.matrix_functions import SqrtRoot, inv_sqrt_matmul, sqrt_matmul
from tests.reference import F64, assert_close, positive, spd

BUILDERS = {
    "kronecker": lambda: Kronecker(spd(3), spd(4)),
    "kronecker_noise": lambda: Kronecker(spd(3, 2), spd(4)) + ScaledIdentity(positive(2), 12),
    "diagonal": lambda: Diagonal(positive(2, 7)),
    "scaled_identity": lambda: ScaledIdentity(positive(3), 5),
    "lowrank_noise": lambda: LowRank(torch.randn(9, 3, dtype=F64)) + ScaledIdentity(positive(2), 9),
    "lowrank_rank_deficient": lambda: LowRank(torch.randn(9, 1, dtype=F64).expand(9, 3)) + ScaledIdentity(0.5, 9),
    "dense": lambda: Dense(spd(10, 2)),
    "kronecker_diagonal_noise": lambda: Kronecker(spd(3), spd(4)) + Diagonal(positive(12)),
}


def check_square_roots(op, rtol=1e-8, tol=None):
    a = op.to_dense()
    x = torch.randn(*op.batch_shape, op.n, 3, dtype=op.dtype)
    half = sqrt_matmul(op, x, tol=tol)
    assert half.shape == x.shape
    assert_close(sqrt_matmul(op, half, tol=tol), a @ x, rtol, rtol)
    white = inv_sqrt_matmul(op, x, tol=tol)
    assert_close(inv_sqrt_matmul(op, white, tol=tol), torch.linalg.solve(a, x), rtol, rtol)
    # the symmetric root: <y, A^{1/2} x> = <A^{1/2} y, x>, and A^{-1/2} A^{1/2} x = x
    y = torch.randn_like(x)
    assert_close((y * half).sum(-2), (sqrt_matmul(op, y, tol=tol) * x).sum(-2), rtol, rtol)
    assert_close(inv_sqrt_matmul(op, half, tol=tol), x, rtol, rtol)
    v = torch.randn(op.n, dtype=op.dtype)
    assert_close(sqrt_matmul(op, v, tol=tol), sqrt_matmul(op, v[:, None], tol=tol)[..., 0])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_structured_and_dense_rules(name):
    torch.manual_seed(0)
    check_square_roots(BUILDERS[name]())


@pytest.fixture
def lanczos(monkeypatch):
    monkeypatch.setattr(mf, "DENSE_N", 0)  # force Lanczos quadrature on small operators


@pytest.mark.parametrize("name", ["dense", "kronecker_diagonal_noise"])
def test_lanczos_quadrature(lanczos, name):
    torch.manual_seed(1)
    op = {"dense": lambda: Dense(spd(40, 2)), "kronecker_diagonal_noise": BUILDERS["kronecker_diagonal_noise"]}[name]()
    assert mf.structured_function(op, torch.zeros(op.n, 1, dtype=F64), mf._power(0.5)) is None
    check_square_roots(op, rtol=1e-7, tol=1e-11)


def test_lanczos_stops_early_on_easy_spectra(lanczos, monkeypatch):
    calls = []
    op = Dense(spd(200, shift=5.0))  # well conditioned: converges in far fewer than 200 steps
    original = Dense._matmul
    monkeypatch.setattr(Dense, "_matmul", lambda self, x: calls.append(1) or original(self, x))
    out = sqrt_matmul(op, torch.randn(200, 2, dtype=F64), tol=1e-8)
    assert len(calls) < 60 and torch.isfinite(out).all()


def test_float32():
    a = spd(12)
    x = torch.randn(12, 2)
    out = sqrt_matmul(Dense(a.float()), x)
    assert out.dtype == torch.float32
    assert_close(sqrt_matmul(Dense(a.float()), out), (a @ x.double()), 1e-4, 1e-4)


def test_sqrt_root_samples_have_the_covariance():
    op = Kronecker(spd(3), spd(2)) + Diagonal(positive(6))  # no structured root of its own beyond Concat
    root = SqrtRoot(op)
    dense = root.to_dense()
    assert_close(dense @ dense.mT, op.to_dense())
    eye = torch.eye(6, dtype=F64)
    assert_close(root @ eye, dense)
    assert_close(root.mT @ eye, dense)
    assert root.shape == op.shape


def test_gradients(lanczos):
    def f(a, b, s, x):
        structured = Kronecker(a, b) + ScaledIdentity(s, 6)
        return sqrt_matmul(structured, x), inv_sqrt_matmul(Dense(a @ a.mT + torch.eye(3, dtype=F64)), x[:3], tol=1e-14)

    ins = (spd(3).requires_grad_(), spd(2).requires_grad_(), positive().requires_grad_(),
           torch.randn(6, 2, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(f, ins)

    def g(w, s, x):
        return inv_sqrt_matmul(LowRank(w) + ScaledIdentity(s, 5), x)

    ins = (torch.randn(5, 2, dtype=F64, requires_grad=True), positive().requires_grad_(),
           torch.randn(5, 1, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(g, ins)


def test_vmap_over_structured_rules_equals_a_loop():
    a, b, x = spd(3, 4), spd(2, 4), torch.randn(4, 6, 2, dtype=F64)

    def f(a, b, x):
        return inv_sqrt_matmul(Kronecker(a, b) + ScaledIdentity(torch.tensor(0.2, dtype=F64), 6), x)

    assert_close(vmap(f)(a, b, x), torch.stack([f(a[i], b[i], x[i]) for i in range(4)]))


def test_bad_arguments():
    op = Dense(spd(4))
    with pytest.raises(ValueError, match=r"rhs: expected a tensor of shape \(4,\)"):
        sqrt_matmul(op, torch.randn(5, 2, dtype=F64))
    with pytest.raises(TypeError, match="rhs: expected dtype"):
        sqrt_matmul(op, torch.randn(4, 2))
    with pytest.raises(TypeError, match="op: expected a structgp operator"):
        sqrt_matmul(spd(4), torch.randn(4, 2, dtype=F64))
