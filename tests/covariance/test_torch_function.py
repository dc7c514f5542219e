"""torch functions on operators: structured rules against dense float64 torch, fallbacks warned and guarded."""

import math
import warnings

import pytest
import torch
from torch.func import grad, vmap

import structgp as sg
from structgp.covariance import (
    AddedDiagonal,
    Dense,
    DensifyError,
    Diagonal,
    Kronecker,
    LowRank,
    Operator,
    ScaledIdentity,
    Sum,
)
from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.linear_map import Product
from structgp.covariance.sparse_lifted import SparseLifted
from structgp.covariance.torch_function import DenseFallbackWarning
from tests.reference import F64, assert_close, positive, spd


def _lift(n_out: int, n_in: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n_out)
    dense = torch.randn(n_out, n_in, dtype=F64, generator=gen)
    return (dense * (torch.rand(n_out, n_in, generator=gen) < 0.5)).to_sparse()


BUILDERS = {
    "dense": lambda: Dense(spd(5)),
    "dense_batched": lambda: Dense(spd(4, 2, 3)),
    "diagonal": lambda: Diagonal(positive(2, 6)),
    "scaled_identity": lambda: ScaledIdentity(positive(3), 4),
    "lowrank_noise": lambda: LowRank(torch.randn(2, 7, 2, dtype=F64)) + Diagonal(positive(2, 7)),
    "kronecker_noise": lambda: Kronecker(spd(3, 2), spd(2)) + ScaledIdentity(positive(2), 6),
    "block_diag": lambda: BlockDiag(spd(3, 2, 3)),
    "sparse_lifted": lambda: SparseLifted(_lift(7, 4), spd(4)) + Diagonal(positive(7)),
    "sum": lambda: Dense(spd(4)) + LowRank(torch.randn(4, 1, dtype=F64)) + ScaledIdentity(0.5, 4),
}


@pytest.fixture(params=list(BUILDERS))
def pair(request):
    torch.manual_seed(0)
    op = BUILDERS[request.param]()
    return op, op.to_dense()


def test_products(pair):
    op, a = pair
    x = torch.randn(*op.batch_shape, op.n, 3, dtype=F64)
    assert_close(torch.matmul(op, x), a @ x)
    assert_close(torch.matmul(x.mT, op), x.mT @ a)
    assert_close(x.mT @ op, x.mT @ a)  # Tensor.__matmul__ routed through __torch_function__
    v = torch.randn(op.n, dtype=F64)
    assert_close(torch.matmul(op, v), a @ v)
    if op.dim() == 2:
        assert_close(torch.mm(op, x), a @ x)
        assert_close(torch.mv(op, v), a @ v)


def test_solves_and_determinants(pair):
    op, a = pair
    x = torch.randn(*op.batch_shape, op.n, 2, dtype=F64)
    assert_close(torch.linalg.solve(op, x), torch.linalg.solve(a, x), 1e-8, 1e-8)
    v = torch.randn(*op.batch_shape, op.n, dtype=F64)
    assert_close(torch.linalg.solve(op, v), torch.linalg.solve(a, v), 1e-8, 1e-8)
    assert_close(torch.linalg.solve(op, x.mT, left=False), torch.linalg.solve(a, x.mT, left=False), 1e-8, 1e-8)
    sign, logabsdet = torch.linalg.slogdet(op)
    ref_sign, ref_logdet = torch.linalg.slogdet(a)
    assert_close(sign, ref_sign)
    assert_close(logabsdet, ref_logdet, 1e-8, 1e-8)
    assert_close(torch.logdet(op), torch.logdet(a), 1e-8, 1e-8)
    assert_close(torch.det(op), torch.det(a), 1e-8, 1e-10)
    assert_close(torch.slogdet(op).logabsdet, ref_logdet, 1e-8, 1e-8)


def test_diagonals_and_eigenvalues(pair):
    op, a = pair
    for offset in (0, 1, -2):
        assert_close(torch.diagonal(op, offset, -2, -1), torch.diagonal(a, offset, -2, -1))
    assert_close(torch.diagonal(op, dim1=-1, dim2=-2), torch.diagonal(a, dim1=-1, dim2=-2))
    if op.dim() == 2:
        assert_close(torch.diag(op), torch.diag(a))
        assert_close(torch.diag(op, 1), torch.diag(a, 1))
        assert_close(torch.trace(op), torch.trace(a))
    assert_close(torch.linalg.eigvalsh(op), torch.linalg.eigvalsh(a), 1e-8, 1e-8)


def test_reductions_over_matrix_dims(pair):
    op, a = pair
    for dim in (-1, -2, (-2, -1), op.dim() - 1):
        for keepdim in (False, True):
            assert_close(torch.sum(op, dim, keepdim), torch.sum(a, dim, keepdim))
            assert_close(torch.mean(op, dim, keepdim=keepdim), torch.mean(a, dim, keepdim=keepdim))
    assert_close(torch.sum(op), torch.sum(a))
    assert_close(torch.mean(op), torch.mean(a))


def test_reductions_over_batch_dims_stay_operators(pair):
    op, a = pair
    if not op.batch_shape:
        pytest.skip("unbatched")
    out = torch.sum(op, 0)
    assert isinstance(out, Operator)
    assert_close(out.to_dense(), a.sum(0))
    mean = torch.mean(op, dim=0)
    assert isinstance(mean, Operator)
    assert_close(mean.to_dense(), a.mean(0))
    assert_close(torch.sum(op, (0, -1)), a.sum((0, -1)))


def test_batch_sums_keep_structure():
    w = torch.randn(3, 6, 2, dtype=F64)
    assert isinstance(torch.sum(LowRank(w), 0), LowRank)  # the members' columns side by side
    assert torch.sum(LowRank(w), 0).rank == 6
    op = LowRank(w) + Diagonal(positive(3, 6))
    total = torch.sum(op, 0)
    assert isinstance(total, AddedDiagonal) and isinstance(total.base, LowRank)
    assert_close(total.to_dense(), op.to_dense().sum(0))


def test_add_scalars_and_tensors(pair):
    op, a = pair
    for c in (0.5, 2, torch.tensor(0.25, dtype=F64)):
        out = torch.add(op, c)
        assert isinstance(out, Operator)  # + c 1 1^T: a rank-one term
        assert_close(out.to_dense(), a + c)
    sym = spd(op.n)
    for out in (torch.add(op, sym), op + sym, sym + op, torch.add(sym, op, alpha=2.0)):
        assert isinstance(out, Operator)
    assert_close(torch.add(sym, op, alpha=2.0).to_dense(), torch.add(sym, a, alpha=2.0))
    assert_close((sym + op).to_dense(), sym + a)
    with pytest.warns(DenseFallbackWarning, match="torch.add"):
        out = torch.add(op, -1.0)  # indefinite in general: not a covariance
    assert isinstance(out, torch.Tensor)
    assert_close(out, a - 1.0)
    skew = torch.randn(op.n, op.n, dtype=F64)
    with pytest.warns(DenseFallbackWarning):
        assert_close(torch.add(op, skew), a + skew)


def test_mul_and_div(pair):
    op, a = pair
    out = torch.mul(op, 2.0)
    assert type(out) is type(op)
    assert_close(out.to_dense(), 2 * a)
    scale = positive(*op.batch_shape)[..., None, None] if op.batch_shape else torch.tensor(3.0, dtype=F64)
    assert_close(torch.mul(scale, op).to_dense(), scale * a)
    assert_close(torch.div(op, 4.0).to_dense(), a / 4)
    with pytest.warns(DenseFallbackWarning):
        assert_close(torch.mul(op, -1.0), -a)
    with pytest.warns(DenseFallbackWarning):
        assert_close(torch.square(op), a.square())


def test_hadamard_product_is_dense():
    a, b = spd(4), spd(4)
    with pytest.warns(DenseFallbackWarning, match="torch.mul"):
        out = torch.mul(Dense(a), b)
    assert_close(out, a * b)


def test_tensor_operators_keep_the_operators_reflected_semantics():
    c, a = positive(3), spd(4)
    scaled = c * Dense(a)  # c (...) is a batch of scales, as Operator.__rmul__ defines
    assert isinstance(scaled, Dense) and scaled.batch_shape == (3,)
    assert_close(scaled.to_dense(), c[:, None, None] * a)
    assert_close(c.mul(Dense(a)).to_dense(), c[:, None, None] * a)
    summed = spd(4) + Dense(a)
    assert isinstance(summed, Operator)
    with pytest.raises(ValueError, match="symmetric"):  # t + op adds t as a Dense covariance term
        torch.randn(4, 4, dtype=F64) + Dense(a)
    with pytest.warns(DenseFallbackWarning, match="torch.Tensor.sub"):
        assert_close(a - Dense(a), torch.zeros(4, 4, dtype=F64))


def test_transposes_are_the_operator(pair):
    op, _ = pair
    assert op.mT is op
    assert torch.transpose(op, -1, -2) is op
    assert torch.adjoint(op) is op
    if op.dim() == 2:
        assert op.T is op and torch.t(op) is op
    else:
        with pytest.raises(ValueError, match="mT"):
            _ = op.T


def test_clone_detach_numel():
    a = spd(3).requires_grad_()
    op = Kronecker(a, spd(2)) + ScaledIdentity(0.1, 6)
    assert torch.numel(op) == 36
    d = torch.detach(op)
    assert type(d) is type(op) and not any(t.requires_grad for t in d._tensors())
    c = torch.clone(op)
    assert c.base.factors[0].matrix is not a
    assert_close(c.to_dense(), op.to_dense())


def test_operator_products_are_lazy_maps():
    a, b = Dense(spd(4)), Diagonal(positive(4))
    p = torch.matmul(a, b)
    assert isinstance(p, Product)
    assert_close(p.to_dense(), a.to_dense() @ b.to_dense())
    assert_close((a @ b).mT.to_dense(), b.to_dense() @ a.to_dense())


def test_unstructured_function_falls_back_with_a_warning():
    a = spd(4)
    with pytest.warns(DenseFallbackWarning, match=r"torch.exp has no structured rule for Dense\(4x4"):
        out = torch.exp(Dense(a))
    assert_close(out, torch.exp(a))
    with pytest.warns(DenseFallbackWarning, match="torch.stack"):
        stacked = torch.stack([Dense(a), Diagonal(positive(4))])
    assert stacked.shape == (2, 4, 4)
    with pytest.warns(DenseFallbackWarning, match="torch.linalg.inv"):
        assert_close(torch.linalg.inv(Dense(a)), torch.linalg.inv(a))


def test_fallback_refuses_large_dense_forms():
    factors = [spd(64) for _ in range(3)]  # N = 262 144: the dense matrix would take 512 GiB
    op = Kronecker(*factors) + ScaledIdentity(0.1, 64**3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the guard raises before any warning or allocation
        with pytest.raises(DensifyError, match="GiB"):
            torch.exp(op)
        with pytest.raises(DensifyError):
            torch.linalg.inv(op)
    # structured rules still answer
    ref = sum(64**2 * torch.linalg.eigvalsh(f).log().sum() for f in factors)
    assert torch.isfinite(torch.logdet(op))
    assert torch.logdet(Kronecker(*factors)).item() == pytest.approx(ref.item(), rel=1e-8)
    assert torch.diagonal(op, dim1=-2, dim2=-1).shape == (64**3,)
    assert torch.sum(op, -1).shape == (64**3,)
    with sg.settings(dense_limit=2**10), pytest.raises(DensifyError):
        torch.exp(Dense(spd(32)))


def test_float32(pair):
    op64, a = pair
    op = op64.to(torch.float32)
    x = torch.randn(*op.batch_shape, op.n, 2)
    assert torch.linalg.solve(op, x).dtype == torch.float32
    assert_close(torch.linalg.solve(op, x), torch.linalg.solve(a, x.double()), 1e-3, 1e-3)
    assert_close(torch.logdet(op), torch.logdet(a), 1e-4, 1e-4)
    assert_close(torch.sum(op, -1), a.sum(-1), 1e-5, 1e-5)
    assert torch.add(op, 1.0).dtype == torch.float32


def test_gradients_through_torch_functions():
    def f(a, b, s, y):
        op = Kronecker(a, b) + ScaledIdentity(s, 6)
        return (
            torch.logdet(op),
            torch.linalg.solve(op, y),
            torch.sum(op, -1),
            torch.diagonal(op, 1, -2, -1),
            torch.linalg.eigvalsh(op),
        )

    ins = (spd(3).requires_grad_(), spd(2).requires_grad_(), positive().requires_grad_(),
           torch.randn(6, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(f, ins)


def test_vmap_and_grad_equal_a_loop():
    mats, ys = spd(4, 3), torch.randn(3, 4, dtype=F64)

    def nll(a, y):
        op = Dense(a) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 4)
        return 0.5 * (torch.logdet(op) + y @ torch.linalg.solve(op, y))

    loop = torch.stack([nll(mats[i], ys[i]) for i in range(3)])
    assert_close(vmap(nll)(mats, ys), loop)
    grads = vmap(grad(nll))(mats, ys)
    for i in range(3):
        a = mats[i].clone().requires_grad_()
        assert_close(grads[i], torch.autograd.grad(nll(a, ys[i]), a)[0])


def test_batch_sum_of_a_structure_without_a_rule_adds_members():
    op = Kronecker(spd(2, 3), spd(3))
    out = torch.sum(op, 0)
    assert isinstance(out, Sum) and len(out.terms) == 3
    assert_close(out.to_dense(), op.to_dense().sum(0))
    assert math.isclose(float(torch.mean(op)), float(op.to_dense().mean()), rel_tol=1e-12)
