import pytest
import torch
from gpytorch.kernels import MaternKernel

from structgp.covariance import BlockDiag
from structgp.kernels import GroupKernel
from tests.reference import F64, assert_close


def _base():
    k = MaternKernel(nu=2.5).double()
    k.lengthscale = 0.6
    return k


def _inputs(labels, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.rand(len(labels), d, dtype=F64, generator=gen)
    return torch.cat([feats, torch.tensor(labels, dtype=F64)[:, None]], -1)


def _masked(k, x1, x2):
    same = x1[:, -1:] == x2[:, -1:].mT
    return k(x1[:, :-1], x2[:, :-1]).to_dense() * same


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 5, 5], [3, 3, 3, 0, 1, 1, 1, 1, 2]])
def test_blocks_match_the_masked_dense_kernel(labels):
    k = _base()
    x = _inputs(labels)
    kernel = GroupKernel(k)
    op = kernel(kernel.check_inputs(x))
    assert isinstance(op, BlockDiag) and op.num_blocks == len(set(labels))
    assert_close(op.to_dense(), _masked(k, x, x), 1e-12, 1e-12)


def test_uniform_groups_are_one_stack():
    op = GroupKernel(_base())(_inputs([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert len(op.groups) == 1 and op.groups[0].shape == (3, 3, 3)


def test_cross_prior_and_label_column():
    k = _base()
    x = _inputs([0, 0, 1, 1, 1])
    xt = _inputs([1, 0, 2, 1], seed=1)  # any order, unseen groups
    kernel = GroupKernel(k)
    assert_close(kernel.cross(xt, x), _masked(k, xt, x), 1e-12, 1e-12)
    assert_close(kernel.prior_diagonal(xt), k(xt[:, :-1], diag=True), 1e-12, 1e-12)
    assert_close(kernel.prior(xt).to_dense(), _masked(k, xt, xt), 1e-12, 1e-12)
    first = GroupKernel(k, group_column=0)
    moved = torch.cat([x[:, -1:], x[:, :-1]], -1)
    assert_close(first(moved).to_dense(), _masked(k, x, x), 1e-12, 1e-12)


def test_bad_inputs():
    kernel = GroupKernel(_base())
    with pytest.raises(ValueError, match="train_x: the rows of each group must be contiguous"):
        kernel.check_inputs(_inputs([0, 1, 0]), "train_x")
    with pytest.raises(ValueError, match="integer-valued group labels"):
        kernel.check_inputs(_inputs([0, 0.5]))
    with pytest.raises(ValueError, match="a group label column"):
        kernel.check_inputs(torch.rand(3, 1, dtype=F64))
    with pytest.raises(ValueError, match="unbatched base kernel"):
        GroupKernel(MaternKernel(batch_shape=torch.Size([2])))
