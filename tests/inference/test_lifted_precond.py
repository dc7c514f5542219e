"""The latent eigen preconditioner of SparseLifted + diagonal noise against float64 dense references and
the exact latent Woodbury engine."""

import pytest
import torch

import structgp as sg
from structgp._config import current
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity, SparseLifted
from structgp.inference.preconditioners import Jacobi, LowRankDiagonal, build
from tests.inference.test_lifted_woodbury import random_lift
from tests.inference.test_preconditioners import dense_of, rbf
from tests.reference import F64, positive, spd


def trilinear_lift(n_out: int, g: int, seed: int = 0) -> torch.Tensor:
    """Trilinear interpolation of ``n_out`` random points onto a ``g^3`` grid (8 nonzeros a row), COO."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_out, 3, generator=gen, dtype=F64) * (g - 1)
    lo = x.floor().clamp(max=g - 2).long()
    t = x - lo
    rows, cols, vals = [], [], []
    for corner in range(8):
        bits = [(corner >> a) & 1 for a in range(3)]
        w = torch.ones(n_out, dtype=F64)
        index = torch.zeros(n_out, dtype=torch.long)
        for a, bit in enumerate(bits):
            w = w * (t[:, a] if bit else 1 - t[:, a])
            index = index * g + lo[:, a] + bit
        rows.append(torch.arange(n_out))
        cols.append(index)
        vals.append(w)
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (n_out, g**3), check_invariants=True).coalesce()


def reference(lift: torch.Tensor, b: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ``P = L U_k Lambda_k U_k^T L^T + diag(d)`` from a dense ``eigh`` of ``B`` ``(..., n_in, n_in)``."""
    lam, u = torch.linalg.eigh(b)
    top = u[..., -k:] @ torch.diag_embed(lam[..., -k:]) @ u[..., -k:].mT
    return lift @ top @ lift.mT + torch.diag_embed(d)


def kron_base(sizes=(3, 4, 2), batch=()):
    return Kronecker(
        *(rbf(torch.linspace(0, 1, m, dtype=F64), 0.4 + 0.1 * i).expand(*batch, m, m) for i, m in enumerate(sizes))
    )


@pytest.mark.parametrize("base_kind", ["kronecker", "dense", "low_rank"])
@pytest.mark.parametrize("noise_batch", [(), (2,)])
def test_inverse_logdet_and_root_against_dense(base_kind, noise_batch):
    n_out, n_in, k = 30, 24, 5
    lift, dense_lift = random_lift(n_out, n_in, "csr", density=0.2)
    base = {
        "kronecker": kron_base(),
        "dense": Dense(spd(n_in, seed=3)),
        "low_rank": LowRank(torch.randn(n_in, 8, dtype=F64, generator=torch.Generator().manual_seed(4))),
    }[base_kind]
    d = positive(*noise_batch, n_out)
    op = SparseLifted(lift, base) + Diagonal(d)
    with sg.settings(precond_rank=k, preconditioner="lifted_eigen"):
        p = build(op, current())
    assert isinstance(p, LowRankDiagonal) and p.rank == k
    ref = reference(dense_lift, base.to_dense(), d, k)
    members = d.reshape(-1, n_out)
    for i in range(members.shape[0]):  # dense_of works on one batch member (identity products)
        with sg.settings(precond_rank=k, preconditioner="lifted_eigen"):
            member = build(SparseLifted(lift, base) + Diagonal(members[i]), current())
        ref_i = ref.reshape(-1, n_out, n_out)[i]
        _, inv, root = dense_of(member, n_out)
        torch.testing.assert_close(inv, torch.linalg.inv(ref_i))
        torch.testing.assert_close(root @ root.mT, ref_i)
    torch.testing.assert_close(p.logdet(), torch.linalg.slogdet(ref)[1])


def test_full_latent_rank_is_the_operator_itself():
    lift, _ = random_lift(20, 12, "coo")
    op = SparseLifted(lift, kron_base((3, 4))) + ScaledIdentity(torch.tensor(0.3, dtype=F64), 20)
    with sg.settings(precond_rank=64, preconditioner="lifted_eigen"):
        p = build(op, current())
    assert p.rank == 12  # clamped to n_in
    a = op.to_dense()
    _, inv, root = dense_of(p, 20)
    torch.testing.assert_close(inv, torch.linalg.inv(a))
    torch.testing.assert_close(root, root.mT)  # with s I noise the root is the symmetric square root
    torch.testing.assert_close(root @ root, a)
    torch.testing.assert_close(p.logdet(), torch.linalg.slogdet(a)[1])


def test_batched_kronecker_base():
    lift, dense_lift = random_lift(16, 24, "csr", density=0.3)
    base = kron_base(batch=(2,))
    d = positive(16)
    with sg.settings(precond_rank=7, preconditioner="lifted_eigen"):
        p = build(SparseLifted(lift, base) + Diagonal(d), current())
    ref = reference(dense_lift, base.to_dense(), d, 7)
    torch.testing.assert_close(p.logdet(), torch.linalg.slogdet(ref)[1])
    r = torch.randn(2, 16, 3, dtype=F64)
    torch.testing.assert_close(p.solve(r), torch.linalg.solve(ref, r))


def test_choice_errors_rank_zero_and_float32():
    lift, _ = random_lift(20, 12, "csr")
    op = SparseLifted(lift, spd(12, seed=1)) + Diagonal(positive(20))
    p = build(op, current())  # auto
    assert p.name == "lifted latent eigen + noise"
    with sg.settings(precond_rank=0):
        p = build(op, current())
    assert isinstance(p, Jacobi)
    torch.testing.assert_close(p.d, op.diagonal())
    with sg.settings(preconditioner="lifted_eigen"), pytest.raises(ValueError, match="SparseLifted"):
        build(Dense(spd(5)) + Diagonal(positive(5)), current())
    with sg.settings(precond_rank=4):
        p32 = build(op.to(torch.float32), current())
    r = torch.randn(20, 2)
    assert p32.solve(r).dtype == torch.float32 and p32.root_matmul(r).dtype == torch.float32
    with sg.settings(precond_rank=4):
        torch.testing.assert_close(p32.solve(r).double(), build(op, current()).solve(r.double()), rtol=1e-4, atol=1e-4)


def large_problem():
    """Trilinear lift of 2000 points onto a 12^3 grid (Kronecker RBF base) plus heteroskedastic noise."""
    g, n = 12, 2000
    x = torch.linspace(0, 1, g, dtype=F64)
    base = Kronecker(rbf(x, 0.5), rbf(x, 0.6), rbf(x, 0.45))
    gen = torch.Generator().manual_seed(1)
    d = 0.05 + 0.05 * torch.rand(n, generator=gen, dtype=F64)
    y = torch.randn(n, generator=gen, dtype=F64)
    return SparseLifted(trilinear_lift(n, g), base), d, y


def test_cg_matches_exact_latent_woodbury_in_fewer_iterations():
    lifted, d, y = large_problem()
    op = lifted + Diagonal(d)
    with sg.settings(method="woodbury"):
        quad0, logdet0 = op.inv_quad_logdet(y)
        x0 = op.solve(y)
    assert sg.last_report().method == "woodbury"
    iterations = {}
    for name in ("lifted_eigen", "pivoted_cholesky"):
        with sg.settings(method="cg", preconditioner=name, cg_tol=1e-10):
            quad, logdet = op.inv_quad_logdet(y)
            rep = sg.last_report()
            assert rep.method == "cg"
            iterations[name] = rep.iterations
            if name == "lifted_eigen":
                assert "lifted latent eigen" in " ".join(rep.notes)
                torch.testing.assert_close(quad, quad0, rtol=1e-6, atol=0)
                torch.testing.assert_close(logdet, logdet0, rtol=1e-6, atol=0)
                torch.testing.assert_close(op.solve(y), x0, rtol=1e-6, atol=1e-6 * float(x0.abs().max()))
    assert iterations["lifted_eigen"] < iterations["pivoted_cholesky"], iterations
    with sg.settings(method="cg", cg_tol=1e-10):  # auto picks it for SparseLifted + diagonal
        op.inv_quad_logdet(y)
    assert "lifted latent eigen" in " ".join(sg.last_report().notes)


def test_cg_gradient_of_inv_quad_matches_woodbury():
    lifted, d, y = large_problem()

    def grads(**cfg):
        noise = d.clone().requires_grad_()
        values = lifted.lift.values.clone().requires_grad_()
        lift = torch.sparse_coo_tensor(
            torch.stack([lifted.lift.row, lifted.lift.col]), values, lifted.lift.shape, check_invariants=True
        )
        with sg.settings(**cfg):
            quad, _ = (SparseLifted(lift, lifted.base) + Diagonal(noise)).inv_quad_logdet(y)
        return torch.autograd.grad(quad, (noise, values))

    exact = grads(method="woodbury")
    iterative = grads(method="cg", preconditioner="lifted_eigen", cg_tol=1e-10)
    for got, ref in zip(iterative, exact):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
