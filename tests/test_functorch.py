"""Operators are pytrees: torch.func.vmap and torch.func.grad see through them."""

import torch
import torch.utils._pytree as pytree
from torch.func import grad, vmap

from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from tests.reference import F64, positive, spd


def nll(op, y):
    q, l = op.inv_quad_logdet(y)
    return 0.5 * (q + l)


def test_pytree_roundtrip():
    op = Kronecker(spd(2), Dense(spd(3))) + ScaledIdentity(0.1, 6)
    leaves, spec = pytree.tree_flatten(op)
    assert all(isinstance(x, torch.Tensor) for x in leaves) and len(leaves) == 3
    back = pytree.tree_unflatten(leaves, spec)
    torch.testing.assert_close(back.to_dense(), op.to_dense())
    moved = op.to(torch.float32)
    assert moved.dtype == torch.float32


def test_vmap_over_operator_inputs_equals_loop():
    w, d, y = torch.randn(4, 10, 3, dtype=F64), positive(4, 10), torch.randn(4, 10, dtype=F64)
    ops = LowRank(w) + Diagonal(d)
    out = vmap(nll)(ops, y)
    loop = torch.stack([nll(LowRank(w[i]) + Diagonal(d[i]), y[i]) for i in range(4)])
    torch.testing.assert_close(out, loop)


def test_vmap_over_builders_of_kronecker_and_dense():
    x = torch.linspace(0, 1, 6, dtype=F64)
    y = torch.randn(36, dtype=F64)

    def build(lengthscale):
        k = torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)
        return nll(Kronecker(k, k) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 36), y)

    ls = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(vmap(build)(ls), torch.stack([build(v) for v in ls]))
    mats = spd(4, 3)
    torch.testing.assert_close(vmap(lambda a: Dense(a).logdet())(mats), torch.linalg.slogdet(mats)[1])


def test_grad_and_vmap_of_grad():
    w, d, y = torch.randn(3, 8, 2, dtype=F64), positive(3, 8), torch.randn(3, 8, dtype=F64)

    def loss(w, d, y):
        return nll(LowRank(w) + Diagonal(d), y)

    gw = vmap(grad(loss))(w, d, y)
    ref = []
    for i in range(3):
        wi = w[i].clone().requires_grad_()
        ref.append(torch.autograd.grad(loss(wi, d[i], y[i]), wi)[0])
    torch.testing.assert_close(gw, torch.stack(ref))


def test_dense_built_inside_vmap_from_a_captured_matrix():
    b = spd(3)
    out = vmap(lambda x: Dense(b) @ x)(torch.randn(2, 3, 1, dtype=F64))
    assert out.shape == (2, 3, 1)


def test_func_grad_through_the_kronecker_eigen_path_matches_dense():
    x = torch.linspace(0, 1, 6, dtype=F64)
    y = torch.randn(36, dtype=F64)

    def kernel(ls):
        return torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ls**2)

    def structured(ls, s):
        k = kernel(ls)
        q, l = (Kronecker(k, k) + ScaledIdentity(s, 36)).inv_quad_logdet(y)
        return q + l + (Kronecker(k, k) + ScaledIdentity(s, 36)).solve(y).sum()

    def dense(ls, s):
        a = torch.kron(kernel(ls), kernel(ls)) + s * torch.eye(36, dtype=F64)
        return y @ torch.linalg.solve(a, y) + torch.logdet(a) + torch.linalg.solve(a, y).sum()

    ls, s = torch.tensor(0.3, dtype=F64), torch.tensor(0.1, dtype=F64)
    for got, want in zip(grad(structured, argnums=(0, 1))(ls, s), grad(dense, argnums=(0, 1))(ls, s)):
        torch.testing.assert_close(got, want)
