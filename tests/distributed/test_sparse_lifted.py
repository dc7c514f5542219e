"""A SparseLifted's rows across processes: 2 gloo ranks (torch.multiprocessing) against one process, float64.

One spawned session computes, on each rank: the lift's products ``L x``, ``L^T y`` with their gradients and
forward-mode derivatives (and their gradcheck); the log-likelihood of ``L K L^T + D`` and its gradients in
the grid lengthscales, the lift's values and the noise through the default engine, the latent Woodbury
engine (gram form ``M = L^T D^-1 L``, row form ``F = L R``, and a singular base's spectral root with its
surrogate gradients) and ``method="cg"``, with the solves; and the seed 002
model at a small size (an ``m^3`` RBF grid lifted by a random sparse lift, 4 entries a row) through
``ExactGP``: loss, gradients and predictions. The parent computes the same in this (single) process and
against dense torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import gpytorch
import pytest
import torch
import torch.distributions as tdist
from torch import Tensor

import structgp as sg
from structgp.covariance import Diagonal, Kronecker, ScaledIdentity, SparseLifted
from structgp.covariance.lift_gram import lift_gram
from structgp.covariance.sparse_lifted import Lift
from structgp.distributions import MultivariateNormal
from structgp.kernels import AggregationKernel
from structgp.models import ExactGP
from tests.distributed.spawn import join, spawn

F64 = torch.float64
# cg_tol 1e-12: the ranks sum over their rows in another order than one process, and two correct solves agree to
# about the tolerance (at 1e-11 the lift values' gradient differed by 2.7e-11 of its largest entry)
CG = {"method": "cg", "cg_tol": 1e-12, "num_probes": 8, "precond_rank": 8, "seed": 3}
# the other preconditioners of a partitioned lifted run (Jacobi) and one that keeps the vectors whole
OTHER_PRECONDITIONERS = ({**CG, "preconditioner": "jacobi"}, {**CG, "preconditioner": "pivoted_cholesky"})
FULL_RANK = {**CG, "precond_rank": 20}  # every latent eigenpair of the "gram" problem's 4 x 5 grid
ENGINES = ({}, {"method": "woodbury"}, CG)  # the default (dense Cholesky below 512 rows), latent Woodbury, PCG/SLQ
# (rows, grid, noise, nugget): 151 rows over a 4 x 5 grid take the gram form (ranks own 76 and 75 rows), 31
# rows over an 8 x 8 grid the row form (16 and 15 rows); 120 rows over a 16 x 16 grid without a nugget, singular
# in float64, the base's spectral root (gradients through first-order surrogates)
PROBLEMS = {
    "gram": (151, (4, 5), "diagonal", 1e-3),
    "rows": (31, (8, 8), "scaled", 1e-3),
    "spectral": (120, (16, 16), "diagonal", 0.0),
}
M = 6  # the seed 002 grid: 6^3 = 216 cells, 300 observations


# -- the problems (the same in every process) --------------------------------------------------------------


def random_lift(n_out: int, n_in: int, per_row: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(indices (2, nnz), values (nnz,))`` of a random lift with ``per_row`` distinct columns a row."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.rand(n_out, n_in, generator=gen).argsort(-1)[:, :per_row].sort(-1).values
    rows = torch.arange(n_out).repeat_interleave(per_row)
    values = torch.rand(n_out * per_row, generator=gen, dtype=F64) + 0.2
    return torch.stack([rows, cols.reshape(-1)]), values


def sparse_csr(indices: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """The CSR tensor of entries ``indices`` ``(2, nnz)`` and ``values`` ``(nnz,)`` (differentiable in them)."""
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True).coalesce().to_sparse_csr()


def grid_gram(n: int, lengthscale: Tensor, nugget: float) -> Tensor:
    """An RBF Gram matrix on ``n`` points of [0, 1] plus ``nugget`` times the identity."""
    x = torch.linspace(0, 1, n, dtype=F64)
    gram = torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale.square())
    return gram + nugget * torch.eye(n, dtype=F64)


def leaves(name: str) -> dict[str, Tensor]:
    """The problem's differentiable leaves and data."""
    n_out, grid, noise, _ = PROBLEMS[name]
    indices, values = random_lift(n_out, math.prod(grid), 3, seed=len(name))
    gen = torch.Generator().manual_seed(7)
    n_noise = n_out if noise == "diagonal" else 1
    return {
        "lengthscales": torch.tensor([0.3, 0.5], dtype=F64).requires_grad_(),
        "values": values.requires_grad_(),
        "noise": (0.05 + 0.1 * torch.rand(n_noise, generator=gen, dtype=F64)).requires_grad_(),
        "y": torch.randn(n_out, generator=gen, dtype=F64),
        "indices": indices,
    }


def covariance(p: dict[str, Tensor], name: str) -> SparseLifted:
    """``L (K_1 (x) K_2) L^T + D`` for the leaves ``p``."""
    n_out, grid, noise, nugget = PROBLEMS[name]
    lift = sparse_csr(p["indices"], p["values"], (n_out, math.prod(grid)))
    base = Kronecker(*(grid_gram(n, ls, nugget) for n, ls in zip(grid, p["lengthscales"])))
    d = Diagonal(p["noise"]) if noise == "diagonal" else ScaledIdentity(p["noise"][0], n_out)
    return SparseLifted(lift, base) + d


def loglik(name: str, options: dict) -> dict[str, Tensor]:
    """The log-likelihood, its gradients in the lengthscales, lift values and noise, and the solve."""
    p = leaves(name)
    cov = covariance(p, name)
    with sg.settings(**options):
        value = MultivariateNormal(torch.zeros_like(p["y"]), cov).log_prob(p["y"])
        note = str(sg.last_report())
        grads = torch.autograd.grad(value, [p["lengthscales"], p["values"], p["noise"]])
        solve = cov.solve(p["y"].unsqueeze(-1)).detach()
    tag = f"{name} {options.get('method', 'auto')}"
    out = {f"{tag} value": value.detach(), f"{tag} solve": solve, f"{tag} report": note}
    out.update({f"{tag} grad {i}": g for i, g in enumerate(grads)})
    return out


def products() -> dict[str, object]:
    """``L x`` and ``L^T y`` for a 7 x 5 lift (ranks own 4 and 3 rows), the gradients of a weighted sum in the
    values, ``x`` and ``y``, the forward-mode derivative in the values, and their gradcheck."""
    indices, values = random_lift(7, 5, 2, seed=4)
    lift = Lift.from_tensor(sparse_csr(indices, values, (7, 5)))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    v = values.clone().requires_grad_()

    def both(v, x, y):
        return lift.matmul(x, v), lift.tmatmul(y, v)

    lx, lty = both(v, x, y)
    grads = torch.autograd.grad((lx * lx.detach()).sum() + (lty * lty.detach()).sum(), [v, x, y])
    _, tangent = torch.func.jvp(lambda v: both(v, x.detach(), y.detach()), (v.detach(),), (torch.ones_like(v),))
    ok = torch.autograd.gradcheck(both, (v, x, y))
    flat = [lx, lty, *grads, *tangent]
    # rows 3-5 empty: rank 1 (rows 3-5) holds no entries
    sparse = Lift.from_tensor(sparse_csr(indices[:, :6], values[:6], (6, 5)))
    w = values[:6].clone().requires_grad_()
    lx, lty = sparse.matmul(x, w), sparse.tmatmul(y[:6], w)
    grads = torch.autograd.grad((lx * lx.detach()).sum() + (lty * lty.detach()).sum(), [w, x, y])
    flat += [lx, lty, *grads]
    own = sorted(key for key in lift._cache if key[0] == "rows")  # the row views this rank applied
    return {"products": torch.cat([t.detach().reshape(-1) for t in flat]), "product gradcheck": ok, "own rows": own}


def seed002_model() -> ExactGP:
    """An ``M^3`` RBF grid lifted by a random sparse lift (4 entries a row) plus learned noise and mean."""
    axis = torch.linspace(-2, 2, M, dtype=F64)
    indices, values = random_lift(300, M**3, 4, seed=2)
    lift = sparse_csr(indices, values, (300, M**3))
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(300, generator=gen, dtype=F64)
    rbf = gpytorch.kernels.RBFKernel()
    model = ExactGP(lift, y, AggregationKernel([rbf, rbf, rbf], [axis, axis, axis])).double()
    model.likelihood.noise = 0.1
    return model


def seed002(options: dict) -> dict[str, Tensor]:
    """The seed 002 model's loss, its gradients in every parameter, and predictions at 5 new rows and at 1 (fewer
    rows than ranks: that lift is applied whole on every rank)."""
    model = seed002_model()
    with sg.settings(**options):
        loss = model.loss()
        note = str(sg.last_report())
        grads = torch.autograd.grad(loss, [p for _, p in sorted(model.named_parameters())])
        indices, values = random_lift(5, M**3, 4, seed=9)
        mean, var = model.predict(sparse_csr(indices, values, (5, M**3)))
        one = torch.cat(model.predict(sparse_csr(indices[:, :4], values[:4], (1, M**3))))
    tag = f"seed002 {options.get('method', 'auto')}"
    out = {f"{tag} value": loss.detach(), f"{tag} report": note, f"{tag} predict": torch.cat([mean, var, one]).detach()}
    out.update({f"{tag} grad {i}": g for i, g in enumerate(grads)})
    return out


def evaluate() -> dict[str, object]:
    out = products()
    for name in PROBLEMS:
        # the spectral root is the latent Woodbury engine's: the other engines are exercised above
        for options in ENGINES if name != "spectral" else ENGINES[1:2]:
            out.update(loglik(name, options))
    for options in OTHER_PRECONDITIONERS:
        out.update({f"{k} {options['preconditioner']}": v for k, v in loglik("gram", options).items()})
    # the lifted eigen preconditioner of all 20 latent eigenpairs: P = A, so its control variate is in use
    out.update({f"{k} full rank": v for k, v in loglik("gram", FULL_RANK).items()})
    for options in ENGINES[:2]:
        out.update(seed002(options))
    out.update(seed002({**CG, "precond_rank": 64}))  # 68 PCG steps (8: 135)
    return out


def second_derivative() -> list[str | None]:
    """The errors of second derivatives in the lift's values through ``L x`` and through the lift Gram
    ``L^T L`` (None: it was taken)."""
    indices, values = random_lift(7, 5, 2, seed=4)
    lift = Lift.from_tensor(sparse_csr(indices, values, (7, 5)))
    errors = []
    for f in (lambda v: lift.matmul(torch.ones(5, 1, dtype=F64), v).square().sum(), lambda v: lift_gram(lift, v).sum()):
        v = values.clone().requires_grad_()
        try:
            (g,) = torch.autograd.grad(f(v), v, create_graph=True)
            torch.autograd.grad(g.square().sum(), v)
            errors.append(None)
        except NotImplementedError as err:
            errors.append(str(err))
    return errors


def _session(rank: int, world: int, port: int, folder: str) -> None:
    join(rank, world, port, folder, timeout=60.0)
    out = evaluate()
    out["parts"] = sg.distributed.row_range(PROBLEMS["gram"][0])
    out["second derivative"] = second_derivative()
    torch.save(out, Path(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(_session, tmp_path_factory.mktemp("sparse_lifted"))


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    assert not sg.distributed.is_active()
    return evaluate()


# -- tests ------------------------------------------------------------------------------------------------


def same_report(text: str) -> str:
    """The report without PCG's step count and residual, and without the partition note (a rank's own)."""
    text = re.sub(r"\d+ iterations; residual [^;]+", "", text)
    return re.sub(r"; vectors partitioned by rows over \d+ processes \(this rank: rows \d+:\d+\)", "", text)


def numbers(out: dict) -> dict[str, Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


def test_two_processes_equal_one_process(ranks, reference):
    assert ranks[0]["parts"] == ((0, 76), (76, 151))
    expected = numbers(reference)
    assert len(expected) == 66
    for out in ranks:
        assert numbers(out).keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(out[key], value, rtol=1e-10, atol=1e-10, msg=key)
    # the ranks took the engines and forms one process takes (the same report, but for PCG's final residual
    # and step count: the latent vectors are summed in another order, which moves the stopping point by a step)
    for key in (k for k in reference if k.endswith("report")):
        assert same_report(ranks[0][key]) == same_report(ranks[1][key]) == same_report(reference[key]), key
    # PCG ran on each rank's rows of the vectors (the lifted eigen preconditioner on its rows of L)
    partition = {"gram": ((0, 76), (76, 151)), "rows": ((0, 16), (16, 31)), "seed002": ((0, 150), (150, 300))}
    for name, rows in partition.items():
        for r, out in enumerate(ranks):
            start, stop = rows[r]
            note = f"vectors partitioned by rows over 2 processes (this rank: rows {start}:{stop})"
            assert note in out[f"{name} cg report"], (name, out[f"{name} cg report"])
            assert note not in reference[f"{name} cg report"]
    assert "vectors partitioned by rows over 2 processes" in ranks[0]["gram cg report jacobi"]
    # the lifted control variate's partitioned shares (its K U terms) are exercised where it is in use
    for out in (*ranks, reference):
        assert "lifted latent eigen + noise (rank 20)" in out["gram cg report full rank"]
        assert "log-det gradient control variate in use" in out["gram cg report full rank"]
    assert "vectors partitioned by rows over 2 processes" in ranks[0]["gram cg report full rank"]
    assert "preconditioner jacobi" in ranks[0]["gram cg report jacobi"]
    # a pivoted Cholesky of L B L^T + D does not run on rows: the vectors stay whole, the products partitioned
    assert "vectors partitioned" not in ranks[0]["gram cg report pivoted_cholesky"]
    assert "pivoted cholesky" in ranks[0]["gram cg report pivoted_cholesky"]


def test_each_rank_applies_only_its_rows(ranks, reference):
    assert reference["own rows"] == []
    assert [out["own rows"] for out in ranks] == [[("rows", 0, 4)], [("rows", 4, 7)]]


def test_ranks_hold_bitwise_identical_results(ranks):
    for key, value in numbers(ranks[0]).items():
        assert torch.equal(value, ranks[1][key]), key


def test_partitioned_products_pass_gradcheck(ranks):
    assert ranks[0]["product gradcheck"] and ranks[1]["product gradcheck"]


def test_second_derivatives_in_partitioned_lift_values_raise(ranks):
    assert second_derivative() == [None, None]  # one process takes them
    for out in ranks:
        product, gram = out["second derivative"]
        assert "second derivatives in a lift's values are not available" in product
        assert "second derivatives through the lift Gram L^T D^-1 L are not available" in gram


def test_the_engines_and_forms_are_the_intended_ones(reference):
    assert "gram form" in reference["gram auto report"] and "gram form" in reference["gram woodbury report"]
    assert "spectral root of rank" in reference["spectral woodbury report"]
    assert "row form" in reference["rows woodbury report"] and "gram form" in reference["seed002 woodbury report"]
    assert "cholesky" in reference["rows auto report"] and "cholesky" in reference["seed002 auto report"]
    for name in ("gram", "rows", "seed002"):
        assert reference[f"{name} cg report"].startswith("inv_quad_logdet: cg ("), name


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_woodbury_matches_dense_and_cg_solves_agree(reference, name):
    """An independent check of the values compared above: dense torch.distributions, and the two engines'
    solves."""
    p = leaves(name)
    dense = covariance(p, name).to_dense()
    ref = tdist.MultivariateNormal(torch.zeros_like(p["y"]), dense).log_prob(p["y"])
    ref_grads = torch.autograd.grad(ref, [p["lengthscales"], p["values"], p["noise"]])
    torch.testing.assert_close(reference[f"{name} woodbury value"], ref.detach(), rtol=1e-10, atol=1e-10)
    for i, g in enumerate(ref_grads):
        torch.testing.assert_close(reference[f"{name} woodbury grad {i}"], g, rtol=1e-8, atol=1e-8)
    if f"{name} cg solve" in reference:
        cg, woodbury = reference[f"{name} cg solve"], reference[f"{name} woodbury solve"]
        torch.testing.assert_close(cg, woodbury, rtol=1e-7, atol=1e-8)
    assert any(g.abs().max() > 1e-3 for g in ref_grads)  # gradients that can be wrong
