"""The blockwise engine: solve, logdet, inv_quad_logdet, root and gradients against float64 dense torch."""

import pytest
import torch

import structgp as sg
from structgp.covariance import BlockDiag, BlockDiagRoot, Dense, Diagonal, LowRank, ScaledIdentity
from structgp.inference import NotPositiveDefiniteError
from structgp.inference.blockwise import group_plan
from tests.reference import F64, assert_close, check_against_dense, dense_inv_quad_logdet, positive, spd


def ragged(*batch: int, dtype=F64) -> BlockDiag:
    """Sizes 3, 5, 3, 2 (Dense, LowRank + Diagonal, Dense, Dense)."""
    w, d = torch.randn(*batch, 5, 2, dtype=dtype), positive(*batch, 5, dtype=dtype)
    a0, a2, a3 = spd(3, *batch, dtype=dtype), spd(3, dtype=dtype), spd(2, dtype=dtype)
    return BlockDiag([Dense(a0), LowRank(w) + Diagonal(d), a2, a3])


def methods(op: BlockDiag) -> list[str]:
    return [group_plan(op, j).method for j in range(len(op.groups))]


@pytest.mark.parametrize("batch", [(), (2,), (3, 1)])
def test_uniform_tensor_against_dense(batch):
    op = BlockDiag(spd(4, *batch, 6))
    assert sg.plan(op).method == "blockwise" and methods(op) == ["cholesky"]
    check_against_dense(op)


def test_uniform_low_rank_plus_diagonal_uses_woodbury():
    op = BlockDiag(LowRank(torch.randn(4, 20, 2, dtype=F64)) + Diagonal(positive(4, 20)))
    assert sg.plan(op).method == "blockwise" and methods(op) == ["woodbury"]
    check_against_dense(op)


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("noise", [None, "diag", "scaled"])
def test_ragged_against_dense(batch, noise):
    op = ragged(*batch)
    if noise == "diag":
        op = op + Diagonal(positive(*batch, 13))
    elif noise == "scaled":
        op = op + ScaledIdentity(positive(*batch), 13)
    assert isinstance(op, BlockDiag) and sg.plan(op).method == "blockwise"
    check_against_dense(op)


def test_ragged_groups_pick_their_own_engine():
    w = torch.randn(20, 2, dtype=F64)
    op = BlockDiag([spd(3), LowRank(w) + Diagonal(positive(20)), spd(3)]) + ScaledIdentity(0.1, 26)
    assert methods(op) == ["cholesky", "woodbury"]
    op.logdet()
    report = str(sg.last_report())
    assert report.startswith("logdet: blockwise") and "woodbury" in report and "cholesky" in report
    check_against_dense(op)


def test_float32_matches_float64():
    op64 = ragged(2) + Diagonal(positive(2, 13))
    op = op64.to(torch.float32)
    v = torch.randn(2, 13, dtype=F64)
    q, ld = op.inv_quad_logdet(v.float())
    rq, rl = dense_inv_quad_logdet(op64.to_dense(), v)
    assert q.dtype == torch.float32 and ld.dtype == torch.float32
    assert_close(q, rq, 1e-4, 1e-4)
    assert_close(ld, rl, 1e-4, 1e-4)
    assert_close(op.solve(v.float()), torch.linalg.solve(op64.to_dense(), v), 1e-4, 1e-4)


def test_rhs_broadcasting_and_extra_batch():
    op = BlockDiag(spd(3, 2, 4))  # batch (2,), N = 12
    a = op.to_dense()
    x = torch.randn(12, 5, dtype=F64)  # broadcast against the batch
    assert_close(op.solve(x), torch.linalg.solve(a, x.expand(2, 12, 5)))
    v = torch.randn(7, 2, 12, dtype=F64)  # extra leading samples share the factorisation
    q, ld = op.inv_quad_logdet(v)
    rq, rl = dense_inv_quad_logdet(a, v)
    assert q.shape == (7, 2) and ld.shape == (2,)
    assert_close(q, rq)
    assert_close(ld, rl)


def test_root_is_block_diagonal():
    op = ragged() + Diagonal(positive(13))
    r = op.root()
    assert isinstance(r, BlockDiagRoot)
    k = r.shape[-1]
    dense = r.to_dense()
    assert dense.shape == (13, k)
    assert_close(dense @ dense.mT, op.to_dense())
    x = torch.randn(k, 2, dtype=F64)
    assert_close(r @ x, dense @ x)
    y = torch.randn(3, 13, 2, dtype=F64)
    assert_close(r.tmatmul(y), dense.mT @ y)
    # rows of different blocks use disjoint columns
    support = (dense != 0).double()
    overlap = support @ support.mT
    assert (overlap[op.to_dense() == 0] == 0).all()


def test_gradients_match_dense_autograd():
    torch.manual_seed(0)
    a0, a2 = spd(3, 2).requires_grad_(), spd(2).requires_grad_()
    w, d = torch.randn(5, 2, dtype=F64, requires_grad=True), positive(5).requires_grad_()
    s = positive(2).requires_grad_()
    b = torch.randn(2, 10, dtype=F64, requires_grad=True)
    params = (a0, a2, w, d, s, b)

    op = BlockDiag([Dense(a0), LowRank(w) + Diagonal(d), a2]) + ScaledIdentity(s, 10)
    q, ld = op.inv_quad_logdet(b)
    x = op.solve(b)
    grads = torch.autograd.grad((q + ld).sum() + x.square().sum(), params)

    ref = torch.stack([torch.block_diag(a0[i], w @ w.mT + torch.diag(d), a2) for i in range(2)])
    ref = ref + s[:, None, None] * torch.eye(10, dtype=F64)
    rq, rl = dense_inv_quad_logdet(ref, b)
    rx = torch.linalg.solve(ref, b.unsqueeze(-1)).squeeze(-1)
    ref_grads = torch.autograd.grad((rq + rl).sum() + rx.square().sum(), params)
    def sym(g):  # only the symmetric part of a symmetric matrix's gradient is defined
        return (g + g.mT) / 2

    grads = [sym(grads[0]), sym(grads[1]), *grads[2:]]
    ref_grads = [sym(ref_grads[0]), sym(ref_grads[1]), *ref_grads[2:]]
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_gradcheck():
    torch.manual_seed(1)
    a = spd(2, 2).requires_grad_()
    c = spd(3).requires_grad_()
    w = torch.randn(3, 1, dtype=F64, requires_grad=True)
    d = positive(3).requires_grad_()
    b = torch.randn(10, dtype=F64, requires_grad=True)
    eps = torch.randn(11, 2, dtype=F64)

    def f(a, c, w, d, b):
        op = BlockDiag([a[0], LowRank(w) + Diagonal(d), c, a[1]])
        q, ld = op.inv_quad_logdet(b)
        sample = op.root() @ eps  # (10, 2): root columns 2 + 2 + (1 + 3) + 3
        return q, ld, op.solve(b).sum(), (sample * b[:, None]).sum()

    assert torch.autograd.gradcheck(f, (a, c, w, d, b))


def test_forced_method_applies_to_the_blocks():
    op = BlockDiag(LowRank(torch.randn(3, 20, 2, dtype=F64)) + Diagonal(positive(3, 20)))
    with sg.settings(method="cholesky"):
        p = sg.plan(op)
        assert p.method == "blockwise" and not p.forced and methods(op) == ["cholesky"]
        check_against_dense(op)
    with sg.settings(method="blockwise"):
        assert methods(op) == ["woodbury"]
        check_against_dense(op)
    with sg.settings(method="eigen"), pytest.raises(ValueError, match="block group 0"):
        op.logdet()


def test_cost_is_sum_of_group_costs():
    op = ragged()
    cost = sg.plan(op).cost
    groups = [group_plan(op, j).cost for j in range(len(op.groups))]
    assert cost.flops == sum(c.flops for c in groups) and cost.bytes == sum(c.bytes for c in groups)
    assert cost.flops < sg.plan(Dense(op.to_dense())).cost.flops


def indefinite(m: int) -> torch.Tensor:
    return torch.diag(torch.tensor([1.0] * (m - 1) + [-1.0], dtype=F64))


def test_non_psd_block_is_named_uniform():
    t = spd(3, 8)
    t[5] = indefinite(3)
    op = BlockDiag(t)
    with pytest.raises(NotPositiveDefiniteError, match=r"block\(s\) \[5\]"):
        op.logdet()
    with pytest.raises(NotPositiveDefiniteError, match=r"block\(s\) \[5\]"):
        op.root()


def test_non_psd_block_is_named_ragged():
    blocks = [spd(3), LowRank(torch.randn(5, 2, dtype=F64)) + Diagonal(positive(5)), indefinite(3), spd(2)]
    op = BlockDiag(blocks)
    with pytest.raises(NotPositiveDefiniteError, match=r"block\(s\) \[2\]"):
        op.inv_quad_logdet(torch.randn(13, dtype=F64))
    with pytest.raises(NotPositiveDefiniteError, match=r"block\(s\) \[2\]"):
        op.solve(torch.randn(13, dtype=F64))
