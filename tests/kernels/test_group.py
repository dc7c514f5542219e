import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

import structgp as sg
from structgp.covariance import BlockDiag, Permuted
from structgp.kernels import GroupKernel
from structgp.kernels.group import group_layout
from structgp.models import ExactGP
from tests.models.dense_gp import DenseGP, diag
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
    with pytest.raises(ValueError, match="train_x: expected integer-valued group labels"):
        kernel.check_inputs(_inputs([0, 1.5, 0]), "train_x")
    with pytest.raises(ValueError, match="integer-valued group labels"):
        kernel.check_inputs(_inputs([0, 0.5]))
    with pytest.raises(ValueError, match="a group label column"):
        kernel.check_inputs(torch.rand(3, 1, dtype=F64))
    with pytest.raises(ValueError, match="unbatched base kernel"):
        GroupKernel(MaternKernel(batch_shape=torch.Size([2])))


# -- rows in any order ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "labels",
    [[0, 1, 2, 0, 1, 2, 0, 1, 2], [2, 0, 1, 0, 2, 2, 1, 0, 0, 3], [1, 0, 1]],
)
def test_shuffled_rows_are_a_permuted_block_diag(labels):
    k = _base()
    x = _inputs(labels, seed=3)
    kernel = GroupKernel(k)
    op = kernel(kernel.check_inputs(x))
    assert isinstance(op, Permuted) and isinstance(op.base, BlockDiag)
    assert op.base.num_blocks == len(set(labels))
    assert_close(op.to_dense(), _masked(k, x, x), 1e-12, 1e-12)
    # the blocks are the groups in label order, each group's rows in the order given (a stable sort)
    order = torch.tensor(labels).argsort(stable=True)
    assert_close(op.base.to_dense(), _masked(k, x[order], x[order]), 1e-12, 1e-12)


def test_equal_size_shuffled_groups_are_one_stack():
    op = GroupKernel(_base())(_inputs([0, 1, 2, 2, 1, 0, 1, 0, 2]))
    assert isinstance(op, Permuted) and len(op.base.groups) == 1 and op.base.groups[0].shape == (3, 3, 3)


def test_contiguous_rows_in_any_label_order_stay_a_plain_block_diag():
    op = GroupKernel(_base())(_inputs([2, 2, 0, 1, 1, 1]))
    assert isinstance(op, BlockDiag)
    assert group_layout(torch.tensor([2.0, 2, 0, 1, 1, 1])).perm is None


def test_layout_is_the_stable_argsort_and_its_inverse():
    labels = torch.tensor([1.0, 0, 1, 2, 0])
    layout = group_layout(labels)
    assert layout.sizes == [2, 2, 1]
    assert layout.order.tolist() == [1, 4, 0, 2, 3]
    assert layout.perm.tolist() == [2, 0, 3, 4, 1]  # perm[i]: the sorted position of row i


def _group_problem(n=24, seed=11):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen).to(F64)
    feats = torch.rand(n, 2, dtype=F64, generator=gen)
    x = torch.cat([feats, labels[:, None]], -1)
    y = torch.sin(4 * feats[:, 0]) + labels * 0.3 + 0.1 * torch.randn(n, dtype=F64, generator=gen)
    xt = torch.cat([torch.rand(7, 2, dtype=F64, generator=gen), torch.tensor([[3.0], [0], [1], [5], [2], [0], [1]],
                                                                              dtype=F64)], -1)
    return x, y, xt


def _model(x, y):
    k = ScaleKernel(RBFKernel()).double()
    k.base_kernel.lengthscale = 0.4
    k.outputscale = 1.3
    model = ExactGP(x, y, GroupKernel(k))
    model.likelihood.noise = torch.tensor(0.05, dtype=F64)
    return model


def test_exact_gp_on_shuffled_rows_equals_sorted_rows_and_dense():
    x, y, xt = _group_problem()
    order = x[:, -1].argsort(stable=True)
    shuffled, ordered = _model(x, y), _model(x[order], y[order])
    a = shuffled.train_covariance()
    assert isinstance(a, Permuted) and isinstance(a.base, BlockDiag)
    assert sg.plan(a).method == "permuted" and "blockwise" in sg.plan(a).reason
    assert isinstance(ordered.train_covariance(), BlockDiag)
    k = shuffled.kernel.base_kernel
    with torch.no_grad():
        ref = DenseGP(_masked(k, x, x), 0.05 * torch.eye(24, dtype=F64), shuffled.mean(x), y)
        mean_ref, cov_ref = ref.posterior(_masked(k, xt, x), _masked(k, xt, xt), shuffled.mean(xt))
        for model in (shuffled, ordered):
            assert_close(model.marginal_log_likelihood(), ref.mll())
            mean, var = model.predict(xt)
            assert_close(mean, mean_ref)
            assert_close(var, diag(cov_ref))
            post = model.posterior(xt)
            assert_close(post.covariance_matrix, cov_ref)
            noisy = model.predict(xt, observation_noise=True)[1]
            assert_close(noisy, diag(cov_ref) + 0.05)


def test_gradients_and_fitting_match_sorted_rows():
    x, y, _ = _group_problem(seed=12)
    order = x[:, -1].argsort(stable=True)
    shuffled, ordered = _model(x, y), _model(x[order], y[order])
    grads = [torch.autograd.grad(m.loss(), list(m.parameters())) for m in (shuffled, ordered)]
    for g, r in zip(*grads):
        assert_close(g, r, 1e-10, 1e-12)
    losses = [m.fit(optimizer="adam", iterations=5, lr=0.1, progress=False) for m in (shuffled, ordered)]
    assert len(losses[0]) >= 5 and losses[0][-1] < losses[0][0]
    assert_close(torch.tensor(losses[0], dtype=F64), torch.tensor(losses[1], dtype=F64), 1e-10, 1e-12)
    for p, q in zip(shuffled.parameters(), ordered.parameters()):
        assert_close(p.detach(), q.detach(), 1e-9, 1e-12)


def test_float32_model_on_shuffled_rows():
    x, y, xt = _group_problem(seed=13)
    m64 = _model(x, y)
    m32 = _model(x.float(), y.float())
    assert_close(m32.marginal_log_likelihood(), m64.marginal_log_likelihood().detach(), 1e-4, 1e-4)
    with torch.no_grad():
        assert_close(m32.predict(xt.float())[0], m64.predict(xt)[0], 1e-4, 1e-4)
