"""Rows of products and entries (structgp.covariance.local_rows) against dense float64 torch, in one process."""

from __future__ import annotations

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, KernelOperator, Kronecker, ScaledIdentity, Sum
from structgp.covariance.indexing import entries
from structgp.covariance.local_rows import matmul_rows, partitionable, weighted_columns

F64 = torch.float64


def _operators(x, raw, noise):
    rbf = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    matern = gpytorch.kernels.MaternKernel(nu=1.5).double()
    k_rbf = KernelOperator(rbf, x, [torch.tensor(0.2, dtype=F64), raw])
    k_matern = KernelOperator(matern, x, [raw])
    return {
        "rbf + diagonal": k_rbf + Diagonal(noise),
        "matern + scaled identity": k_matern + ScaledIdentity(torch.tensor(0.3, dtype=F64), x.shape[0]),
        "sum": Sum(k_matern, k_rbf + Diagonal(noise)),
        "bare kernel": k_rbf,
    }


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(23, 2, generator=gen, dtype=F64) * 2
    noise = 0.1 + torch.rand(23, generator=gen, dtype=F64)
    return x, torch.tensor([[-0.3]], dtype=F64), noise


@pytest.mark.parametrize("name", ["rbf + diagonal", "matern + scaled identity", "sum", "bare kernel"])
@pytest.mark.parametrize("span", [(0, 23), (5, 17), (22, 23), (7, 7)])
@pytest.mark.parametrize("tiles", [None, 20 * 8 * 32])  # one tile; a budget for 4 x 5 tiles
def test_rows_of_the_product_and_entries_equal_dense(data, name, span, tiles):
    op = _operators(*data)[name]
    dense = op.to_dense()
    v = torch.randn(23, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    start, stop = span
    with sg.settings(**({} if tiles is None else {"memory_budget": tiles})):
        got = matmul_rows(op, v, start, stop)
    torch.testing.assert_close(got, (dense @ v)[start:stop], rtol=1e-12, atol=1e-12)
    rows, cols = torch.tensor([3, 0, 22, 3]), torch.tensor([3, 7, 0])
    torch.testing.assert_close(entries(op, rows.unsqueeze(-1), cols), dense[rows][:, cols], rtol=1e-12, atol=1e-12)
    assert partitionable(op)


@pytest.mark.parametrize("name", ["rbf + diagonal", "matern + scaled identity"])
@pytest.mark.parametrize("tiles", [None, 20 * 8 * 32])  # one tile; a budget for 4 x 5 tiles
def test_rows_of_the_product_pass_gradcheck(data, name, tiles):
    """The rows' own backward (rhs: ``K[rows, :]^T G``; x, the kernel's raw parameter and the noise: the
    rows' share, which is the whole gradient of those rows), in one tile and in 4 x 5 tiles."""
    x, raw, noise = (t.clone().requires_grad_() for t in data)
    v = torch.randn(23, 2, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def rows(x, raw, noise, v):
        return matmul_rows(_operators(x, raw, noise)[name], v, 4, 19)

    with sg.settings(**({} if tiles is None else {"memory_budget": tiles})):
        if tiles is not None:
            assert _operators(*data)["bare kernel"].tile() == (4, 5)
        assert torch.autograd.gradcheck(rows, (x, raw, noise, v))


def test_entries_pass_gradcheck(data):
    x, raw, noise = (t.clone().requires_grad_() for t in data)
    index = torch.tensor([1, 9, 14])
    here = torch.arange(6, 20)
    assert torch.autograd.gradcheck(
        lambda x, raw, noise: entries(_operators(x, raw, noise)["sum"], here.unsqueeze(-1), index), (x, raw, noise)
    )


def test_other_structures_are_not_partitionable(data):
    x, raw, noise = data
    dense = Dense(torch.eye(4, dtype=F64) * 2)
    assert not partitionable(dense)
    assert not partitionable(Kronecker(dense, dense))
    kernel = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])).double()
    assert not partitionable(KernelOperator(kernel, x))  # batched
    with pytest.raises(TypeError, match="op: Dense has no partitioned product"):
        matmul_rows(dense, torch.ones(4, 1, dtype=F64), 0, 2)


@pytest.mark.parametrize("name", ["rbf + diagonal", "matern + scaled identity", "sum"])
def test_weighted_columns_equal_the_dense_sum_and_pass_gradcheck(data, name, monkeypatch):
    """``sum_ij W_ij A[start + i, S_j]`` by row blocks (3 rows a block here), its value and its gradients in
    x, the raw parameter, the noise and the weights, against dense float64; S holds rows inside and outside
    start:stop, so the diagonal's rule is exercised both ways."""
    import structgp.covariance.local_rows as local_rows

    monkeypatch.setattr(local_rows, "WEIGHTED_BLOCK_ENTRIES", 12)  # 12 // 4 columns: 3-row blocks
    cols = torch.tensor([2, 9, 15, 21])
    start, stop = 6, 17
    w = torch.randn(stop - start, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    op = _operators(*data)[name]
    value = weighted_columns(op, start, stop, cols, w)
    torch.testing.assert_close(value, (w * op.to_dense()[start:stop][:, cols]).sum(), rtol=1e-12, atol=1e-12)
    x, raw, noise = (t.clone().requires_grad_() for t in data)
    w = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, raw, noise, w: weighted_columns(_operators(x, raw, noise)[name], start, stop, cols, w),
        (x, raw, noise, w),
    )
