"""BlockDiag: layout, structured algebra and validation against torch.block_diag in float64."""

import pytest
import torch
import torch.utils._pytree as pytree

import structgp as sg
from structgp.covariance import AddedDiagonal, BlockDiag, Dense, Diagonal, LowRank, ScaledIdentity
from tests.reference import F64, assert_close, positive, spd


def batched_block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.block_diag`` of ``(*batch, m_i, m_i)`` blocks, batch member by batch member."""
    batch = torch.broadcast_shapes(*(b.shape[:-2] for b in blocks))
    blocks = [b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:]) for b in blocks]
    out = torch.stack([torch.block_diag(*parts) for parts in zip(*blocks, strict=True)])
    return out.reshape(*batch, *out.shape[-2:])


def ragged_blocks(*batch: int) -> tuple[list, list[torch.Tensor]]:
    """Sizes 3, 5, 3, 2: Dense, LowRank + Diagonal, Dense, Dense; and their dense matrices."""
    w, d = torch.randn(*batch, 5, 2, dtype=F64), positive(*batch, 5)
    a0, a2, a3 = spd(3, *batch), spd(3), spd(2, *batch)
    blocks = [Dense(a0), LowRank(w) + Diagonal(d), a2, Dense(a3)]
    return blocks, [a0, w @ w.mT + torch.diag_embed(d), a2, a3]


def check_algebra(op: BlockDiag, ref: torch.Tensor) -> None:
    assert op.shape == ref.shape
    assert_close(op.to_dense(), ref)
    assert_close(op.diagonal(), ref.diagonal(dim1=-2, dim2=-1))
    x = torch.randn(*op.batch_shape, op.n, 3, dtype=F64)
    assert_close(op @ x, ref @ x)
    v = torch.randn(op.n, dtype=F64)
    assert_close(op @ v, ref @ v)
    assert_close(x.mT @ op, x.mT @ ref)


@pytest.mark.parametrize("batch", [(), (2,), (2, 1)])
def test_uniform_tensor(batch):
    t = spd(4, *batch, 5)
    op = BlockDiag(t)
    assert op.shape == torch.Size((*batch, 20, 20)) and op.num_blocks == 5
    assert op.perm is None and op.members is None and len(op.groups) == 1
    check_algebra(op, batched_block_diag(list(t.unbind(-3))))


def test_uniform_layout_needs_no_copy():
    t = spd(4, 6)
    op = BlockDiag(t)
    assert op.groups[0].matrix is t
    x = torch.randn(24, 3, dtype=F64)
    (part,) = op.split_rows(x)
    assert part.shape == (6, 4, 3) and part.data_ptr() == x.data_ptr()


def test_uniform_operator_blocks():
    w, d = torch.randn(3, 6, 2, dtype=F64), positive(3, 6)
    op = BlockDiag(LowRank(w) + Diagonal(d))
    assert isinstance(op.groups[0], AddedDiagonal) and op.num_blocks == 3
    check_algebra(op, torch.block_diag(*(w @ w.mT + torch.diag_embed(d)).unbind(0)))


@pytest.mark.parametrize("batch", [(), (2,)])
def test_ragged_list(batch):
    blocks, mats = ragged_blocks(*batch)
    op = BlockDiag(blocks)
    assert op.shape == torch.Size((*batch, 13, 13)) and op.num_blocks == 4
    assert op.group_blocks() == [(0, 2), (1,), (3,)]
    assert [tuple(g.batch_shape) for g in op.groups] == [(*batch, 2), (*batch, 1), (*batch, 1)]
    rows = op.group_rows()
    assert rows[0].tolist() == [[0, 1, 2], [8, 9, 10]] and rows[2].tolist() == [[11, 12]]
    check_algebra(op, batched_block_diag(mats))


def test_list_in_order_needs_no_permutation():
    mats = [spd(3), spd(3), spd(2)]
    op = BlockDiag(mats)
    assert op.perm is None and op.group_blocks() == [(0, 1), (2,)]
    check_algebra(op, torch.block_diag(*mats))


def test_single_block_list():
    a = spd(4)
    op = BlockDiag([a])
    check_algebra(op, a)


@pytest.mark.parametrize("noise", ["diag", "scaled", "diag_batched"])
@pytest.mark.parametrize("ragged", [True, False])
def test_noise_keeps_block_structure(noise, ragged):
    if ragged:
        blocks, mats = ragged_blocks()
        op, ref = BlockDiag(blocks), torch.block_diag(*mats)
    else:
        t = spd(3, 4)
        op, ref = BlockDiag(t), torch.block_diag(*t.unbind(0))
    n = op.n
    if noise == "diag":
        s = Diagonal(positive(n))
    elif noise == "diag_batched":
        s = Diagonal(positive(2, n))
    else:
        s = ScaledIdentity(positive(), n)
    for total in (op + s, s + op):
        assert isinstance(total, BlockDiag)
        assert all(isinstance(g, AddedDiagonal) for g in total.groups)
        check_algebra(total, ref + s.to_dense())
    if noise == "scaled" and not ragged:  # scalar noise stays scalar per block (eigen paths keep working)
        assert all(isinstance(g.noise, ScaledIdentity) for g in (op + s).groups)


def test_noise_added_twice_and_python_number_noise():
    t, d = spd(3, 4), positive(12)
    op = BlockDiag(t.float())
    total = op + ScaledIdentity(0.5, 12) + Diagonal(d.float())
    assert isinstance(total, BlockDiag) and total.dtype == torch.float32
    ref = torch.block_diag(*t.unbind(0)) + 0.5 * torch.eye(12, dtype=F64) + torch.diag(d)
    assert_close(total.to_dense(), ref, 1e-6, 1e-6)


def test_scale_expand_to_and_pytree():
    blocks, mats = ragged_blocks()
    op = BlockDiag(blocks)
    ref = torch.block_diag(*mats)
    c = positive(3)
    assert_close(op._scale(c).to_dense(), c[:, None, None] * ref)  # a batch of positive scales
    assert_close((2.0 * op).to_dense(), 2 * ref)
    assert_close((op / 2.0).to_dense(), ref / 2)
    assert_close(op.expand(2).to_dense(), ref.expand(2, 13, 13))
    leaves, spec = pytree.tree_flatten(op)
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, BlockDiag) and back.members == op.members
    assert_close(back.to_dense(), ref)
    low = op.to(torch.float32)
    assert low.dtype == torch.float32 and low.perm.dtype == torch.int64
    assert_close(low.to_dense(), ref, 1e-6, 1e-6)


def test_diagonal_blocks_are_diagonal():
    op = BlockDiag([Diagonal(positive(3)), Diagonal(positive(3))])
    assert op.is_diagonal
    assert not BlockDiag(spd(2, 3)).is_diagonal


@pytest.mark.parametrize(
    "blocks, error, match",
    [
        (torch.randn(3, 4, 5, dtype=F64), ValueError, r"blocks: expected a square"),
        (torch.randn(4, 4, dtype=F64), ValueError, r"blocks: expected shape \(\.\.\., b, m, m\)"),
        ([], ValueError, "blocks: expected at least one block"),
        ([spd(2), torch.randn(2, 3, dtype=F64)], ValueError, r"blocks\[1\]: expected a square"),
        ([spd(2), spd(2).float()], TypeError, r"blocks\[1\]: expected dtype torch.float64"),
        ([spd(2, 2), spd(2, 3)], ValueError, r"blocks\[0\].*blocks\[1\]"),
        (Dense(spd(3)), ValueError, "blocks: expected an operator whose last batch dimension"),
        ("blocks", TypeError, "blocks: expected a"),
        ([spd(2), "x"], TypeError, r"blocks\[1\]: expected a structgp operator"),
        (torch.zeros(0, 3, 3, dtype=F64), ValueError, "blocks: expected at least one block"),
    ],
)
def test_bad_inputs_name_the_argument(blocks, error, match):
    with pytest.raises(error, match=match):
        BlockDiag(blocks)


def test_tensor_blocks_are_checked_per_group_and_named():
    bad = spd(3)
    bad[0, 2] += 1.0  # not symmetric
    with pytest.raises(ValueError, match=r"blocks\[2\]: expected a symmetric"):
        BlockDiag([spd(3), spd(2), bad, spd(3)])
    nan = spd(2)
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected finite"):
        BlockDiag([spd(2), nan])
    # a Dense operator and a tensor of one size share a group
    op = BlockDiag([Dense(spd(3)), spd(3)])
    assert len(op.groups) == 1 and isinstance(op.groups[0], Dense)


def test_mixed_devices_are_refused():
    with sg.settings(check_values=False):  # values on the meta device cannot be read
        other = Dense(torch.eye(2, dtype=F64, device="meta"))
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected device cpu"):
        BlockDiag([spd(2), other])


def test_non_finite_tensor_blocks_are_refused():
    t = spd(3, 4)
    t[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks: expected finite"):
        BlockDiag(t)
    big = torch.full((2, 3, 3), 3e38)  # finite entries whose sum overflows: still accepted
    assert BlockDiag(big).shape == (6, 6)


def test_dense_limit_is_respected():
    from structgp.covariance import DensifyError

    op = BlockDiag(spd(4, 8))
    with sg.settings(dense_limit=1000), pytest.raises(DensifyError):
        op.to_dense()
