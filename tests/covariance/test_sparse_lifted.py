import pytest
import torch
import torch.utils._pytree as pytree

import structgp as sg
from structgp.covariance import (
    Dense,
    DensifyError,
    Diagonal,
    Kronecker,
    LiftedRoot,
    LowRank,
    ScaledIdentity,
    SparseLifted,
)
from structgp.covariance.root import DenseRoot
from structgp.covariance.sparse_lifted import Lift
from tests.reference import F64, assert_close, positive, spd

KINDS = ("dense", "coo", "csr")


def random_lift(n_out: int, n_in: int, kind: str, density: float = 0.4, seed: int = 0, dtype=F64):
    """A random lift with empty and full rows, as ``kind``, and its dense float64 matrix."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=gen) < density
    mask[0] = False  # an empty row
    mask[1] = True  # a full row
    dense = torch.randn(n_out, n_in, generator=gen, dtype=F64) * mask
    return as_kind(dense.to(dtype), kind), dense


def as_kind(dense, kind):
    return {"dense": dense, "coo": dense.to_sparse(), "csr": dense.to_sparse_csr()}[kind]


def bases(n_in=6, batch=()):
    return {
        "dense": spd(n_in, *batch),
        "kron": Kronecker(spd(2, *batch), spd(3, *batch)),
        "kron_diag": Kronecker(Dense(spd(3, *batch)), Diagonal(positive(*batch, 2))),
        "low_rank": LowRank(torch.randn(*batch, n_in, 2, dtype=F64)),
    }


def dense_of(base):
    return base if isinstance(base, torch.Tensor) else base.to_dense()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [(), (2,)])
def test_data_against_dense(kind, batch):
    lift, l_dense = random_lift(15, 6, kind)
    for name, base in bases(6, batch).items():
        op = SparseLifted(lift, base)
        ref = l_dense @ dense_of(base) @ l_dense.T
        assert op.shape == (*batch, 15, 15), name
        assert_close(op.to_dense(), ref)
        assert_close(op.diagonal(), ref.diagonal(dim1=-2, dim2=-1))
        x = torch.randn(3, *batch, 15, 4, dtype=F64)
        assert_close(op @ x, ref @ x)
        v = torch.randn(15, dtype=F64)
        assert_close(op @ v, ref @ v)
        assert_close(x.mT @ op, x.mT @ ref)


def test_root_is_lifted_and_structured():
    lift, l_dense = random_lift(12, 6, "csr")
    op = SparseLifted(lift, Kronecker(spd(2), spd(3)))
    ref = l_dense @ op.base.to_dense() @ l_dense.T
    r = op.root()
    assert isinstance(r, LiftedRoot) and r.shape == (12, 6)
    assert_close(r.to_dense() @ r.to_dense().T, ref)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(12, 2, dtype=F64)
    assert_close(r @ x, r.to_dense() @ x)
    assert_close(r.tmatmul(y), r.to_dense().T @ y)
    with sg.settings(dense_limit=100):
        with pytest.raises(DensifyError, match="LiftedRoot"):
            r.to_dense()


def test_lifted_root_constructor_validates():
    lift, _ = random_lift(5, 4, "coo")
    with pytest.raises(TypeError, match="inner"):
        LiftedRoot(lift, torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="lift: expected 3 columns"):
        LiftedRoot(lift, DenseRoot(torch.eye(3, dtype=F64)))
    with pytest.raises(TypeError, match="lift: expected dtype torch.float32"):
        LiftedRoot(lift, DenseRoot(torch.eye(4)))


def test_scale_expand_with_base_and_to():
    lift, l_dense = random_lift(10, 6, "coo")
    base = spd(6)
    op = SparseLifted(lift, base)
    ref = l_dense @ base @ l_dense.T
    assert_close((2.5 * op).to_dense(), 2.5 * ref)
    assert_close((op / 2).to_dense(), ref / 2)
    assert op.expand(3).to_dense().shape == (3, 10, 10)
    assert_close(op.expand(3).to_dense()[1], ref)
    other = spd(6, seed=3)
    swapped = op.with_base(other)
    assert swapped.lift is op.lift  # the canonical lift (and its caches) are shared
    assert_close(swapped.to_dense(), l_dense @ other @ l_dense.T)
    with pytest.raises(ValueError, match="self.lift: expected 5 columns"):
        op.with_base(spd(5))
    low = op.to(torch.float32)
    assert low.dtype == torch.float32 and low.lift.col.dtype == torch.int64
    assert_close(low.to_dense(), ref, rtol=1e-5, atol=1e-5)


def test_pytree_roundtrip_keeps_pattern():
    lift, _ = random_lift(9, 6, "csr")
    op = SparseLifted(lift, Kronecker(spd(2), spd(3))) + ScaledIdentity(0.3, 9)
    leaves, spec = pytree.tree_flatten(op)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    back = pytree.tree_unflatten(leaves, spec)
    assert_close(back.to_dense(), op.to_dense())


def test_canonical_form_sums_duplicates_and_keeps_explicit_entries():
    idx = torch.tensor([[2, 0, 2, 1], [1, 3, 1, 0]])
    vals = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=F64)
    lift = Lift.from_tensor(torch.sparse_coo_tensor(idx, vals, (3, 4)))
    assert lift.nnz == 3  # (2, 1) summed; the explicit zero at (1, 0) kept
    assert lift.crow.tolist() == [0, 1, 2, 3] and lift.col.tolist() == [3, 0, 1]
    assert lift.values.tolist() == [2.0, 0.0, 4.0]
    assert lift.n_pairs == 3
    dense = torch.zeros(3, 4, dtype=F64)
    dense[2, 1], dense[0, 3] = 4.0, 2.0
    assert_close(lift.to_dense(), dense)
    y = torch.randn(3, 2, dtype=F64)
    assert_close(lift.tmatmul(y), dense.T @ y)


def test_zero_lift_and_empty_rows():
    op = SparseLifted(torch.zeros(5, 3, dtype=F64), spd(3))
    assert op.lift.nnz == 0
    assert_close(op.to_dense(), torch.zeros(5, 5, dtype=F64))
    assert_close(op.diagonal(), torch.zeros(5, dtype=F64))
    assert_close(op @ torch.randn(5, 2, dtype=F64), torch.zeros(5, 2, dtype=F64))


@pytest.mark.parametrize("kind", ("coo", "csr"))
def test_gradcheck_sparse_values_and_base(kind):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(7, 4, generator=gen) < 0.5
    idx = mask.nonzero().T
    vals = torch.randn(idx.shape[1], dtype=F64, generator=gen, requires_grad=True)
    a, b = spd(2).requires_grad_(), spd(2).requires_grad_()
    x = torch.randn(2, 7, 2, dtype=F64, requires_grad=True)

    def build(vals):
        coo = torch.sparse_coo_tensor(idx, vals, (7, 4))
        return coo if kind == "coo" else coo.coalesce().to_sparse_csr()

    def f(vals, a, b, x):
        op = SparseLifted(build(vals), Kronecker(a, b))
        return op @ x, op.diagonal(), op.to_dense(), op.root() @ x[0, :4], op.root().tmatmul(x)

    assert torch.autograd.gradcheck(f, (vals, a, b, x), fast_mode=kind == "csr")  # fast: a random projection


def test_dense_lift_gradient_matches_dense_autograd_including_zeros():
    lift, _ = random_lift(8, 5, "dense")
    base = spd(5)
    x = torch.randn(8, 2, dtype=F64)
    leaf = lift.clone().requires_grad_()
    ((SparseLifted(leaf, base) @ x).square().sum() + SparseLifted(leaf, base).diagonal().sum()).backward()
    ref = lift.clone().requires_grad_()
    a = ref @ base @ ref.T
    ((a @ x).square().sum() + a.diagonal().sum()).backward()
    assert (lift == 0).any()
    assert_close(leaf.grad, ref.grad)
    assert torch.autograd.gradcheck(lambda w: SparseLifted(w, base).diagonal(), (lift.clone().requires_grad_(),))


def test_float32_within_float32_tolerance():
    lift, l_dense = random_lift(20, 6, "csr", dtype=torch.float32)
    base = spd(6)
    op = SparseLifted(lift, base.float())
    ref = l_dense @ base @ l_dense.T
    x = torch.randn(20, 3, dtype=F64)
    assert op.dtype == torch.float32
    assert_close(op @ x.float(), ref @ x, rtol=1e-4, atol=1e-4)
    assert_close(op.diagonal(), ref.diagonal(), rtol=1e-4, atol=1e-4)


def test_to_dense_is_guarded_but_products_and_diagonal_are_not():
    lift, l_dense = random_lift(300, 6, "coo", density=0.3)
    op = SparseLifted(lift, spd(6))
    with sg.settings(dense_limit=300 * 300 * 8 - 1):
        with pytest.raises(DensifyError, match="to_dense"):
            op.to_dense()
        ref = l_dense @ op.base.to_dense() @ l_dense.T
        assert_close(op.diagonal(), ref.diagonal())
        x = torch.randn(300, 2, dtype=F64)
        assert_close(op @ x, ref @ x)


def test_bad_inputs_name_the_argument():
    base = spd(4)
    good = torch.randn(5, 4, dtype=F64)
    with pytest.raises(ValueError, match="lift: expected 4 columns"):
        SparseLifted(torch.randn(5, 3, dtype=F64), base)
    with pytest.raises(TypeError, match="lift: .*sparse_coo or torch.sparse_csr, got torch.sparse_csc"):
        SparseLifted(good.to_sparse_csc(), base)
    with pytest.raises(TypeError, match="lift: .*got torch.sparse_bsr"):
        SparseLifted(good.to_sparse_bsr((1, 1)), base)
    with pytest.raises(TypeError, match="lift: expected a torch.Tensor"):
        SparseLifted(good.numpy(), base)
    huge = torch.zeros(1, 1, dtype=F64).expand(2**13 + 1, 2**13)
    with pytest.raises(ValueError, match="lift: a dense .* too large.*sparse COO or CSR"):
        SparseLifted(huge, ScaledIdentity(torch.tensor(1.0, dtype=F64), 2**13))
    nan = good.clone()
    nan[2, 1] = float("nan")
    for kind in KINDS:
        with pytest.raises(ValueError, match="lift: expected finite"):
            SparseLifted(as_kind(nan, kind), base)
    with pytest.raises(TypeError, match="lift: expected dtype torch.float64 \\(the dtype of base\\)"):
        SparseLifted(good.float(), base)
    with pytest.raises(TypeError, match="lift: expected dtype float32 or float64"):
        SparseLifted(good.long(), base)
    with pytest.raises(ValueError, match="lift: expected device cpu .*got meta"):
        SparseLifted(torch.zeros(5, 4, dtype=F64, device="meta"), base)
    with pytest.raises(ValueError, match="lift: expected a 2-D"):
        SparseLifted(torch.randn(2, 5, 4, dtype=F64), base)
    with pytest.raises(ValueError, match="lift: expected a sparse COO matrix without dense dimensions"):
        SparseLifted(good.to_sparse(1), base)
    unsorted = torch.sparse_csr_tensor(torch.tensor([0, 2]), torch.tensor([3, 0]), torch.ones(2, dtype=F64), (1, 4))
    with pytest.raises(ValueError, match="lift: CSR column indices must be sorted"):
        SparseLifted(unsorted, base)
    with pytest.raises(TypeError, match="base"):
        SparseLifted(good, "not an operator")
