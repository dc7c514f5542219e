"""General structured maps: Monarch products, permutations, selections, transposes, against dense torch."""

import time

import pytest
import torch
from torch.func import vmap

from structgp.covariance import Dense, DensifyError, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.covariance.linear_map import (
    BlockDiagMap,
    DenseMap,
    KroneckerMap,
    OperatorMap,
    Permutation,
    Product,
    Selection,
    SparseMap,
    Transpose,
)
from structgp.covariance.root import DenseRoot, KroneckerRoot
from structgp.inference.settings import settings
from tests.reference import F64, assert_close, positive, spd


def block_diag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """``torch.block_diag`` per batch member of ``(*batch, b, m, k)`` blocks."""
    batch = blocks.shape[:-3]
    flat = blocks.reshape(-1, *blocks.shape[-3:])
    out = torch.stack([torch.block_diag(*member) for member in flat])
    return out.reshape(*batch, *out.shape[-2:])


def stride_permutation(rows: int, cols: int) -> torch.Tensor:
    """The dense permutation of ``x.view(rows, cols).T.flatten()``."""
    eye = torch.eye(rows * cols, dtype=F64)
    return eye.view(rows, cols, -1).transpose(0, 1).reshape(rows * cols, -1)


def monarch(b: int, m: int, *batch: int, dtype=F64):
    l, r = torch.randn(*batch, b, m, m, dtype=dtype), torch.randn(*batch, b, m, m, dtype=dtype)
    p = Permutation.reshape_transpose(b, m, dtype=dtype)
    return (p @ BlockDiagMap(l)) @ (p.T @ BlockDiagMap(r)), l, r


@pytest.mark.parametrize("batch", [(), (2,)])
def test_monarch_against_dense(batch):
    b, m = 4, 3
    mon, l, r = monarch(b, m, *batch)
    perm = stride_permutation(b, m)
    ref = perm @ block_diag_dense(l) @ perm.T @ block_diag_dense(r)
    assert isinstance(mon, Product) and len(mon.factors) == 4
    assert mon.shape == (*batch, 12, 12)
    x = torch.randn(*batch, 12, 3, dtype=F64)
    assert_close(mon @ x, ref @ x)
    assert_close(mon.mT @ x, ref.mT @ x)
    assert_close(x.mT @ mon, x.mT @ ref)
    v = torch.randn(12, dtype=F64)
    assert_close(mon @ v, ref @ v)
    assert_close(mon.to_dense(), ref)
    assert_close(mon.mT.to_dense(), ref.mT)


def test_monarch_non_square_blocks_and_float32():
    l, r = torch.randn(4, 2, 3), torch.randn(3, 4, 5)  # (8 x 12) and (12 x 15): non-square blocks
    p_out, p_in = Permutation.reshape_transpose(2, 4), Permutation.reshape_transpose(3, 4)
    mon = p_out @ BlockDiagMap(l) @ p_in @ BlockDiagMap(r)
    ref = stride_permutation(2, 4) @ block_diag_dense(l.double()) @ stride_permutation(3, 4) @ block_diag_dense(
        r.double()
    )
    assert mon.shape == (8, 15)
    x = torch.randn(15, 2)
    out = mon @ x
    assert out.dtype == torch.float32
    assert_close(out, ref @ x.double(), 1e-5, 1e-5)
    y = torch.randn(8, 2)
    assert_close(mon.mT @ y, ref.mT @ y.double(), 1e-5, 1e-5)


def test_monarch_with_262144_columns_is_fast():
    b = m = 512
    gen = torch.Generator().manual_seed(0)
    l, r = torch.rand(b, m, m, generator=gen) - 0.5, torch.rand(b, m, m, generator=gen) - 0.5
    p = Permutation.reshape_transpose(b, m)
    mon = (p @ BlockDiagMap(l)) @ (p.T @ BlockDiagMap(r))
    x = torch.randn(b * m, 3, generator=gen)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        y = mon @ x
        times.append(time.perf_counter() - start)
    # independent reference by reshapes: P^T y reads y as (m, b) and transposes it (b = m here)
    z = torch.bmm(r, x.view(b, m, 3))
    z = z.transpose(0, 1)  # P^T
    z = torch.bmm(l, z.contiguous())
    ref = z.transpose(0, 1).reshape(b * m, 3)  # P
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert min(times) < 2.0, f"{min(times):.2f} s"  # about 0.5 s on 2 cores; the bound allows for load


def test_permutation_and_selection():
    perm = torch.randperm(7)
    p = Permutation(perm, dtype=F64)
    x = torch.randn(7, 2, dtype=F64)
    assert_close(p @ x, x[perm])
    assert_close(p.mT @ (p @ x), x)
    assert isinstance(p.mT, Permutation)
    assert_close(p.to_dense(), torch.eye(7, dtype=F64)[perm])
    idx = torch.tensor([3, 0, 3, 6])
    s = Selection(idx, 7, dtype=F64)
    assert_close(s @ x, x[idx])
    y = torch.randn(4, 2, dtype=F64)
    assert_close(s.mT @ y, s.to_dense().mT @ y)  # duplicates add up
    assert isinstance(s.mT, Transpose)
    with pytest.raises(ValueError, match="perm: expected a permutation"):
        Permutation(torch.tensor([0, 0, 2]))
    with pytest.raises(IndexError, match="index"):
        Selection(torch.tensor([0, 7]), 7)
    with pytest.raises(TypeError, match="1-D int64"):
        Selection(torch.tensor([0.0, 1.0]), 7)


def test_kronecker_and_sparse_maps():
    a, b = torch.randn(2, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    k = KroneckerMap(a, b)
    x = torch.randn(6, 2, dtype=F64)
    assert k.shape == (8, 6)
    assert_close(k @ x, torch.kron(a, b) @ x)
    y = torch.randn(8, 2, dtype=F64)
    assert_close(k.mT @ y, torch.kron(a, b).mT @ y)
    assert isinstance(k.mT, KroneckerMap)
    dense = torch.randn(5, 6, dtype=F64) * (torch.rand(5, 6) < 0.5)
    sm = SparseMap(dense.to_sparse())
    assert_close(sm @ x, dense @ x)
    z = torch.randn(5, 1, dtype=F64)
    assert_close(sm.mT @ z, dense.mT @ z)
    assert_close(sm.mT.to_dense(), dense.mT)
    with pytest.raises(ValueError, match="factors"):
        KroneckerMap()


def test_products_with_operators_and_roots():
    a, d = spd(4), positive(4)
    w = torch.randn(4, 2, dtype=F64)
    prod = Dense(a) @ LowRank(w) @ Diagonal(d)  # operators compose into a (non-symmetric) map
    ref = a @ (w @ w.mT) @ torch.diag(d)
    assert isinstance(prod, Product)
    assert_close(prod.to_dense(), ref)
    root = (Kronecker(spd(2), spd(2)) + ScaledIdentity(0.1, 4)).root()
    both = root.mT @ Dense(a) @ root  # R^T A R with R a structured root
    r = root.to_dense()
    assert_close(both.to_dense(), r.mT @ a @ r)
    assert_close(DenseRoot(w).mT @ torch.ones(4, 1, dtype=F64), w.mT @ torch.ones(4, 1, dtype=F64))
    assert_close((torch.ones(3, 4, dtype=F64) @ DenseMap(w)), torch.ones(3, 4, dtype=F64) @ w)
    assert OperatorMap(Dense(a)).mT.op is not None
    kr = KroneckerRoot([spd(2), spd(3)])
    assert_close(kr.T.to_dense(), kr.to_dense().mT)
    with pytest.raises(ValueError, match="inner sizes"):
        DenseMap(torch.randn(3, 4, dtype=F64)) @ DenseMap(torch.randn(3, 4, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        Product(DenseMap(torch.randn(3, 4, dtype=F64)), DenseMap(torch.randn(4, 2)))
    with pytest.raises(ValueError, match="T: defined for unbatched"):
        _ = DenseMap(torch.randn(2, 3, 4, dtype=F64)).T


def test_to_dense_is_guarded():
    mon, _, _ = monarch(64, 64)
    with settings(dense_limit=2**20), pytest.raises(DensifyError, match="M @ x"):
        mon.to_dense()


def test_gradients_of_a_monarch_product():
    p = Permutation.reshape_transpose(2, 3, dtype=F64)

    def f(l, r, x):
        return ((p @ BlockDiagMap(l)) @ (p.T @ BlockDiagMap(r))) @ x, (BlockDiagMap(l).mT @ p) @ x

    ins = (torch.randn(2, 3, 3, dtype=F64, requires_grad=True), torch.randn(2, 3, 3, dtype=F64, requires_grad=True),
           torch.randn(6, 2, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(f, ins)


def test_vmap_over_a_product_equals_a_loop():
    l, x = torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 8, 2, dtype=F64)
    p = Permutation.reshape_transpose(2, 4, dtype=F64)

    def f(blocks, rhs):
        return (p @ BlockDiagMap(blocks) @ p.T) @ rhs

    assert_close(vmap(f)(l, x), torch.stack([f(l[i], x[i]) for i in range(3)]))
