"""torch.compile(fullgraph=True) over functions that build operators and call the exact paths (solve, logdet,
inv_quad_logdet, MultivariateNormal.log_prob, and the torch-function routes): no graph
breaks, no recompiles for new values of the same shapes, the same values and gradients as eager; and
torch.func.vmap / grad over the torch-function routes equal to a Python loop.

Compilation is slow on 2 cores, so the graphs are small and the backend is ``aot_eager`` (Dynamo and
AOTAutograd trace forward and backward exactly as for inductor; only code generation is skipped).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.func import grad, vmap

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import MultivariateNormal
from tests.reference import F64, assert_close, positive, spd


def dense_cholesky(a, y):
    """The method calls and the torch-function routes (logdet, solve, sums, indexing) of a Dense operator."""
    op = Dense(a) + ScaledIdentity(torch.ones((), dtype=a.dtype), a.shape[-1])
    q, logdet = op.inv_quad_logdet(y)
    dense = Dense(a)
    routes = (torch.logdet(dense), torch.linalg.solve(dense, y), torch.sum(dense, -1), dense[1:3, 1:3].logdet())
    return 0.5 * (q + logdet), op.solve(y), *routes, dense[0, 2]


def low_rank_woodbury(w, d, y):
    op = LowRank(w) + Diagonal(d)
    q, logdet = op.inv_quad_logdet(y)
    log_prob = MultivariateNormal(torch.zeros_like(y), op).log_prob(y)
    return 0.5 * (q + logdet), op.solve(y), op.logdet(), log_prob


def kronecker_eigen(a, b, s, y):
    op = Kronecker(a, b) + ScaledIdentity(s, a.shape[-1] * b.shape[-1])
    q, logdet = op.inv_quad_logdet(y)
    return 0.5 * (q + logdet), op.solve(y)


def leaf(t):
    return t.requires_grad_()


CASES = {
    "dense_cholesky": (dense_cholesky, lambda: (leaf(spd(5)), torch.randn(5, dtype=F64)), "cholesky"),
    "low_rank_woodbury": (
        low_rank_woodbury,
        lambda: (leaf(torch.randn(8, 2, dtype=F64)), leaf(positive(8)), torch.randn(8, dtype=F64)),
        "woodbury",
    ),
    "kronecker_eigen": (
        kronecker_eigen,
        lambda: (leaf(spd(3)), leaf(spd(4)), leaf(positive()), torch.randn(12, dtype=F64)),
        "eigen",
    ),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def grads(outputs, inputs):
    wanted = [x for x in inputs if x.requires_grad]
    return torch.autograd.grad(sum(o.sum() for o in outputs), wanted)


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_no_recompiles_same_values_and_gradients(name):
    fn, make, method = CASES[name]
    with sg.settings(method=method):
        assert sg.plan(_op_of(name, make())).method == method
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        args = make()
        out, ref = compiled(*args), fn(*args)
        for o, r in zip(out, ref):
            assert_close(o, r, 1e-10, 1e-10)
        for g, r in zip(grads(out, args), grads(fn(*args), args)):
            assert_close(g, r, 1e-10, 1e-10)
        with torch.compiler.set_stance("fail_on_recompile"):  # new values, same shapes: the same graph
            for _ in range(2):
                args = make()
                for o, r in zip(compiled(*args), fn(*args)):
                    assert_close(o, r, 1e-10, 1e-10)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


def _op_of(name, args):
    if name == "dense_cholesky":
        return Dense(args[0]) + ScaledIdentity(torch.ones((), dtype=F64), 5)
    if name == "low_rank_woodbury":
        return LowRank(args[0]) + Diagonal(args[1])
    return Kronecker(args[0], args[1]) + ScaledIdentity(args[2], 12)


def test_settings_changes_recompile_instead_of_going_stale():
    def method(w, d):
        op = LowRank(w) + Diagonal(d)
        return op.logdet(), sg.plan(op).method

    compiled = torch.compile(method, fullgraph=True, backend="aot_eager")
    w, d = torch.randn(6, 2, dtype=F64), positive(6)
    assert compiled(w, d)[1] == "woodbury"
    with sg.settings(method="cholesky"):
        value, name = compiled(w, d)
    assert name == "cholesky"
    assert_close(value, torch.linalg.slogdet(w @ w.mT + torch.diag(d))[1])
    assert compiled(w, d)[1] == "woodbury"


def test_vmap_and_grad_of_torch_function_routes_equal_a_loop():
    w, d, y = torch.randn(4, 7, 2, dtype=F64), positive(4, 7), torch.randn(4, 7, dtype=F64)

    def nll(w, d, y):
        op = LowRank(w) + Diagonal(d)
        return 0.5 * (torch.logdet(op) + y @ torch.linalg.solve(op, y)) + torch.sum(op[0:3, 0:3], (-2, -1))

    assert_close(vmap(nll)(w, d, y), torch.stack([nll(w[i], d[i], y[i]) for i in range(4)]))
    gw = vmap(grad(nll))(w, d, y)
    for i in range(4):
        wi = w[i].clone().requires_grad_()
        assert_close(gw[i], torch.autograd.grad(nll(wi, d[i], y[i]), wi)[0])


def test_vmap_over_kronecker_eigen_and_indexing():
    x = torch.linspace(0, 1, 5, dtype=F64)
    y = torch.randn(25, dtype=F64)

    def f(lengthscale):
        k = torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)
        op = Kronecker(k, k) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 25)
        q, logdet = op.inv_quad_logdet(y)
        return q + logdet + op[3, 7] + torch.diagonal(op, 1, -2, -1).sum()

    ls = torch.tensor([0.3, 0.7, 1.5], dtype=F64)
    assert_close(vmap(f)(ls), torch.stack([f(v) for v in ls]))
    assert_close(vmap(grad(f))(ls), torch.stack([grad(f)(v) for v in ls]))
