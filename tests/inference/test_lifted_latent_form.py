"""The lifted Woodbury engine's latent form ``P = L^T D^-1 (L R)`` (latent grids whose dense ``M = L^T D^-1 L``
would not fit)
and its column-chunked surrogate, forced at small sizes, against dense float64 autograd."""

import math

import pytest
import torch
import torch.distributions as tdist

import structgp as sg
from structgp.covariance import Diagonal, Kronecker, ScaledIdentity, SparseLifted
from structgp.inference import lifted_woodbury
from tests.inference.test_lifted_woodbury import interpolation_lift, smooth_grid
from tests.memory_guard import LargestOutput
from tests.reference import F64, assert_close, paired_grads, positive


@pytest.fixture
def latent_form(monkeypatch):
    """The latent form whatever the size (not its Kronecker variant, tested in test_kronecker_latent), and column
    chunks of 3 in the surrogate (n_in = 256)."""
    monkeypatch.setattr(lifted_woodbury, "DENSE_GRAM_ENTRIES", 0)
    monkeypatch.setattr(lifted_woodbury, "_form_flops", lambda lift, rank: (0.0, float("inf")))
    monkeypatch.setattr(lifted_woodbury, "_kron_flops", lambda *args: float("inf"))
    monkeypatch.setattr(lifted_woodbury, "SURROGATE_CHUNK", 3 * 256)


def lifted_loss(lift, make_base, noise: str, d_fixed, check_report):
    """``loss(structured, ls, [s,] y)``: log N(y | 0, L K L^T + noise) + |A^-1 y^T|^2 for ``K = make_base(ls)``
    and ``s I`` (``noise="scaled"``) or ``Diagonal(d_fixed)`` noise: dense (torch.distributions, torch.linalg)
    or structured (``method="woodbury"``; ``check_report`` asserts on the report)."""
    n = lift.shape[0]

    def loss(structured: bool, ls, *rest):
        s, y = rest if noise == "scaled" else (None, rest[0])
        base = make_base(ls)
        noise_op = ScaledIdentity(s, n) if noise == "scaled" else Diagonal(d_fixed)
        if not structured:  # log densities by torch.distributions, solves by torch.linalg, both dense
            dense_lift = lift.to_dense()
            cov = dense_lift @ base.to_dense() @ dense_lift.T + noise_op.to_dense()
            solved = torch.linalg.solve(cov, y.mT)
            return tdist.MultivariateNormal(torch.zeros(n, dtype=F64), cov).log_prob(y).sum() + solved.square().sum()
        with sg.settings(method="woodbury"):
            op = SparseLifted(lift, base) + noise_op
            q, ld = op.inv_quad_logdet(y)
            solved = op.solve(y.mT)
        check_report(str(sg.last_report()), base)
        return (-0.5 * (q + ld + n * math.log(2 * math.pi))).sum() + solved.square().sum()

    return loss


def loss_leaves(n: int, ls: float, noise: str) -> dict[str, torch.Tensor]:
    """The leaves of :func:`lifted_loss`: lengthscale, the noise scale (``"scaled"`` only), two target rows."""
    leaves = {"ls": torch.tensor(ls, dtype=F64), "s": torch.tensor(0.05, dtype=F64), "y": torch.randn(2, n, dtype=F64)}
    if noise != "scaled":
        del leaves["s"]
    return leaves


@pytest.mark.parametrize("noise", ["scaled", "fixed_diagonal"])
def test_latent_form_matches_dense_autograd(latent_form, noise):
    """Values and gradients (lengthscale, noise scale, targets) of the spectral-root path through P = L^T D^-1 (L R)."""
    g, n = 16, 120
    lift = interpolation_lift(n, g).coalesce()

    def check_report(report, base):
        assert "latent form" in report and "spectral root" in report and "Kronecker root" not in report, report

    loss = lifted_loss(
        lift, lambda ls: Kronecker(smooth_grid(g, ls), smooth_grid(g, 2 * ls)), noise, positive(n, low=0.02),
        check_report,
    )
    for name, got, ref in paired_grads(loss, loss_leaves(n, 0.5, noise)):
        assert torch.isfinite(got).all(), name
        assert_close(got, ref, rtol=1e-7, atol=1e-8)


def random_rows(n_out: int, n_cells: int, gen: torch.Generator) -> torch.Tensor:
    """A lift of ``n_out`` rows of 8 random cells with U(0, 1) weights, sparse COO."""
    cols = torch.randint(0, n_cells, (n_out, 8), generator=gen)
    rows = torch.arange(n_out).repeat_interleave(8)
    values = torch.rand(8 * n_out, dtype=F64, generator=gen)
    return torch.sparse_coo_tensor(torch.stack([rows, cols.reshape(-1)]), values, (n_out, n_cells)).coalesce()


def test_planned_for_a_large_latent_grid():
    """Metadata only: 10^5 rows of 8 of 40^3 cells, s I noise: the latent form (the dense M would be 30 GiB)."""
    n_out, m = 100_000, 40
    lift = random_rows(n_out, m**3, torch.Generator().manual_seed(0))
    k = smooth_grid(m, torch.tensor(0.2, dtype=F64))
    op = SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(torch.tensor(0.1, dtype=F64), n_out)
    with sg.settings(method="woodbury"):
        assert "P = L^T D^-1 (L R)" in sg.plan(op).reason


def guarded_value_and_grad(n_out: int, m: int, ls: float):
    """Log-likelihood terms + gradient for ``n_out`` rows of 8 of ``m^3`` cells (an RBF Kronecker base of
    lengthscale ``ls``, ``s I`` noise) under :class:`LargestOutput`: ``(guard, report, base, ls, s)``."""
    gen = torch.Generator().manual_seed(1)
    lift = random_rows(n_out, m**3, gen)
    ls = torch.tensor(ls, dtype=F64, requires_grad=True)
    s = torch.tensor(0.1, dtype=F64, requires_grad=True)
    y = torch.randn(n_out, dtype=F64, generator=gen)
    with LargestOutput() as guard, sg.settings(method="woodbury"):
        k = smooth_grid(m, ls)
        base = Kronecker(k, k, k)
        q, ld = (SparseLifted(lift, base) + ScaledIdentity(s, n_out)).inv_quad_logdet(y)
        (q + ld).backward()
    return guard, str(sg.last_report()), base, ls, s


@pytest.mark.parametrize("form", ["latent", "dense"])
def test_nothing_quadratic_is_allocated(latent_form, monkeypatch, form):
    """Value + gradient on a 16^3 grid (n_in = 4096) with 3000 rows of 8 cells: no op outputs anything of
    n_out^2 / 2 elements or more (n_out x n_out, dense n_out x n_in and n_in x n_in are all larger); the
    spectral root (n_in x r) is far narrower than n_in. The dense gram form, the control, is caught."""
    if form == "dense":
        monkeypatch.setattr(lifted_woodbury, "DENSE_GRAM_ENTRIES", 2**62)
    n_out, m = 3000, 16
    guard, report, _, ls, s = guarded_value_and_grad(n_out, m, 2.0)
    assert "spectral root" in report, report
    if form == "dense":
        assert "gram form M" in report and guard.largest >= m**6, report
        return
    assert "latent form" in report, report
    assert guard.largest < n_out * n_out // 2, guard.where
    assert ls.grad is not None and s.grad is not None
