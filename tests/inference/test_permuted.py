"""The permuted engine: solve, logdet, inv_quad_logdet, root, spectra and gradients of P B P^T against float64
dense torch on the explicitly permuted matrix."""

import pytest
import torch

import structgp as sg
from structgp.covariance import BlockDiag, Dense, Diagonal, Kronecker, LowRank, Permuted, ScaledIdentity
from structgp.distributions import MultivariateNormal
from structgp.inference import NotPositiveDefiniteError, eigvalsh, sqrt_matmul
from structgp.inference.eigsh import structured_eigsh
from structgp.inference.matrix_functions import structured_function
from tests.covariance.test_permuted import perm_of, permuted_dense
from tests.reference import F64, assert_close, check_against_dense, dense_inv_quad_logdet, positive, spd


def ragged(*batch, dtype=F64):
    w, d = torch.randn(*batch, 5, 2, dtype=dtype), positive(*batch, 5, dtype=dtype)
    return BlockDiag([spd(3, *batch, dtype=dtype), LowRank(w) + Diagonal(d), spd(3, dtype=dtype), spd(2, dtype=dtype)])


@pytest.mark.parametrize("batch", [(), (2,), (3, 1)])
@pytest.mark.parametrize("kind", ["uniform", "ragged", "dense"])
def test_against_dense(batch, kind):
    base = {"uniform": lambda: BlockDiag(spd(3, *batch, 4)), "ragged": lambda: ragged(*batch),
            "dense": lambda: Dense(spd(9, *batch))}[kind]()
    perm = perm_of(base.n, 1)
    op = Permuted(base, perm)
    assert_close(op.to_dense(), permuted_dense(base.to_dense(), perm))  # check_against_dense uses to_dense
    check_against_dense(op)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_with_noise_against_dense(batch):
    base = ragged(*batch)
    perm = perm_of(13, 2)
    d = positive(*batch, 13)
    op = Permuted(base, perm) + Diagonal(d)
    ref = permuted_dense(base.to_dense(), perm) + torch.diag_embed(d)
    assert_close(op.to_dense(), ref)
    check_against_dense(op)
    v = torch.randn(*batch, 13, dtype=F64)
    q, ld = op.inv_quad_logdet(v)
    rq, rl = dense_inv_quad_logdet(ref, v)
    assert_close(q, rq)
    assert_close(ld, rl)


def test_plan_and_report_name_the_base_method():
    op = Permuted(BlockDiag(spd(3, 4)), perm_of(12)) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 12)
    p = sg.plan(op)
    assert p.method == "permuted" and "BlockDiag" in p.reason and "blockwise" in p.reason
    assert p.cost == sg.plan(op.base).cost
    op.logdet()
    rep = str(sg.last_report())
    assert rep.startswith("logdet: permuted") and "base BlockDiag: blockwise" in rep and "cholesky" in rep
    lr = Permuted(LowRank(torch.randn(12, 2, dtype=F64)), perm_of(12)) + Diagonal(positive(12))
    assert "woodbury" in sg.plan(lr).reason


def test_forced_method_applies_to_the_base():
    w = torch.randn(12, 2, dtype=F64)
    op = Permuted(LowRank(w) + Diagonal(positive(12)), perm_of(12))
    x = torch.randn(12, 2, dtype=F64)
    ref = torch.linalg.solve(op.to_dense(), x)
    with sg.settings(method="cholesky"):
        assert "with cholesky" in sg.plan(op).reason
        assert_close(op.solve(x), ref)
    with sg.settings(method="eigen"), pytest.raises(ValueError, match="the base of Permuted.*method='eigen'"):
        sg.plan(op)


def test_singular_base_is_refused_with_its_name():
    op = Permuted(LowRank(torch.randn(6, 2, dtype=F64)), perm_of(6))
    with pytest.raises(ValueError, match="the base of Permuted.*add noise"):
        op.logdet()


def test_not_positive_definite_block_is_named():
    bad = -torch.eye(2, dtype=F64)
    op = Permuted(BlockDiag([spd(3), Dense(bad)]), perm_of(5))
    with pytest.raises(NotPositiveDefiniteError, match=r"block\(s\) \[1\]"):
        op.logdet()


def test_float32_matches_float64():
    base = ragged(2)
    perm = perm_of(13, 3)
    op64 = Permuted(base, perm) + Diagonal(positive(2, 13))
    op = op64.to(torch.float32)
    v = torch.randn(2, 13, dtype=F64)
    q, ld = op.inv_quad_logdet(v.float())
    rq, rl = dense_inv_quad_logdet(op64.to_dense(), v)
    assert q.dtype == torch.float32 and ld.dtype == torch.float32
    assert_close(q, rq, 1e-4, 1e-4)
    assert_close(ld, rl, 1e-4, 1e-4)


def test_rhs_broadcasting_and_extra_batch():
    op = Permuted(BlockDiag(spd(3, 2, 4)), perm_of(12, 4))  # batch (2,)
    a = op.to_dense()
    x = torch.randn(12, 5, dtype=F64)
    assert_close(op.solve(x), torch.linalg.solve(a, x.expand(2, 12, 5)))
    xt = torch.randn(2, 5, 12, dtype=F64).mT  # e.g. k(x_*, X)^T in prediction: a transposed view
    assert_close(op.solve(xt), torch.linalg.solve(a, xt))
    v = torch.randn(7, 2, 12, dtype=F64)
    q, ld = op.inv_quad_logdet(v)
    rq, rl = dense_inv_quad_logdet(a, v)
    assert q.shape == (7, 2) and ld.shape == (2,)
    assert_close(q, rq)
    assert_close(ld, rl)


def test_gradcheck():
    perm = torch.tensor([3, 0, 4, 1, 5, 2])  # interleaves the two blocks
    eye = torch.eye(3, dtype=F64)

    def f(blocks, d, v):
        sym = blocks @ blocks.mT + eye
        op = Permuted(BlockDiag(sym), perm) + Diagonal(d)
        q, ld = op.inv_quad_logdet(v)
        return q, ld, op.solve(v), op @ v

    blocks = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    d = positive(6).requires_grad_()
    v = torch.randn(6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (blocks, d, v))


def test_gradients_equal_the_dense_reference():
    perm = perm_of(8, 5)
    blocks = spd(4, 2).requires_grad_()
    d = positive(8).requires_grad_()
    v = torch.randn(8, dtype=F64)
    q, ld = (Permuted(BlockDiag(blocks), perm) + Diagonal(d)).inv_quad_logdet(v)
    grads = torch.autograd.grad(q + ld, (blocks, d))
    dense = permuted_dense(torch.block_diag(*blocks), perm) + torch.diag(d)
    rq, rl = dense_inv_quad_logdet(dense, v)
    ref = torch.autograd.grad(rq + rl, (blocks, d))
    for g, r in zip(grads, ref):
        assert_close(g, r)


def test_root_is_the_permuted_base_root():
    base = ragged()
    perm = perm_of(13, 6)
    op = Permuted(base, perm) + Diagonal(positive(13))
    r = op.root()
    dense = r.to_dense()
    assert_close(dense @ dense.mT, op.to_dense())
    eps = torch.randn(r.shape[-1], 2, dtype=F64)
    assert_close(r @ eps, dense @ eps)
    y = torch.randn(13, 2, dtype=F64)
    assert_close(r.mT @ y, dense.mT @ y)
    root0 = Permuted(base, perm).root().to_dense()  # rows of the base's root, permuted
    assert_close(root0, base.root().to_dense()[perm])


def test_sampling_and_log_prob():
    base = BlockDiag(spd(3, 3))
    perm = perm_of(9, 7)
    op = Permuted(base, perm) + ScaledIdentity(torch.tensor(0.2, dtype=F64), 9)
    loc = torch.randn(9, dtype=F64)
    mvn = MultivariateNormal(loc, op)
    ref = torch.distributions.MultivariateNormal(loc, op.to_dense())
    y = torch.randn(4, 9, dtype=F64)
    assert_close(mvn.log_prob(y), ref.log_prob(y))
    torch.manual_seed(0)
    draws = mvn.rsample(torch.Size([20000]))
    cov = torch.cov(draws.mT)
    assert_close(cov, op.to_dense(), 0.1, 0.1)


def test_spectra_and_matrix_functions_use_the_base_rules():
    kron = Kronecker(spd(2, seed=1), spd(3, seed=2))
    perm = perm_of(6, 8)
    op = Permuted(kron + ScaledIdentity(torch.tensor(0.3, dtype=F64), 6), perm)
    a = op.to_dense()
    assert_close(eigvalsh(op), torch.linalg.eigvalsh(a))
    block = Permuted(BlockDiag(spd(3, 2)), perm)
    assert_close(eigvalsh(block), torch.linalg.eigvalsh(block.to_dense()))
    pairs = structured_eigsh(Permuted(kron, perm), 2, True)  # the Kronecker rule, rows permuted
    assert pairs is not None
    k_dense = Permuted(kron, perm).to_dense()
    assert_close(k_dense @ pairs.eigenvectors, pairs.eigenvectors * pairs.eigenvalues)
    assert_close(pairs.eigenvalues, torch.linalg.eigvalsh(k_dense).flip(-1)[:2])
    assert structured_eigsh(Permuted(spd(300), perm_of(300)), 2, True) is None  # no rule for the base: none
    x = torch.randn(6, 2, dtype=F64)
    evals, evecs = torch.linalg.eigh(a)
    ref = evecs @ (evals.sqrt()[:, None] * (evecs.mT @ x))
    assert_close(structured_function(op, x, torch.sqrt), ref)  # the Kronecker + shift rule
    assert_close(sqrt_matmul(op, x), ref)


def test_compiles_without_graph_breaks():
    perm = perm_of(8, 9)

    def f(blocks, d, y):
        op = Permuted(BlockDiag(blocks), perm) + Diagonal(d)
        q, ld = op.inv_quad_logdet(y)
        return q + ld, op.solve(y)

    args = (spd(4, 2).requires_grad_(), positive(8).requires_grad_(), torch.randn(8, dtype=F64))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(*args), f(*args)
    for o, r in zip(out, ref):
        assert_close(o, r)
    grads = torch.autograd.grad(out[0], args[:2])
    for g, r in zip(grads, torch.autograd.grad(ref[0], args[:2])):
        assert_close(g, r)
