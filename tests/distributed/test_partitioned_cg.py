"""The iterative engine with its vectors partitioned by rows: 2 gloo ranks against one process, float64.

One spawned session computes, on each rank, through ``structgp.inference`` on raw operators: the partitioned
pivoted Cholesky (pivots and each rank's rows of the factor); ``inv_quad_logdet`` with its gradients in the
inputs, the kernel's raw parameters, a heteroskedastic noise and the right-hand side for the preconditioners
``auto`` (pivoted Cholesky and its control variate), ``jacobi`` and ``none``; ``logdet`` alone; ``solve`` with
the gradient of its right-hand side and of the operator (the backward's solve runs partitioned too); a
Matern kernel (the generic block backward) in a ``Sum`` whose pivoted Cholesky has no noise term (the
control variate's remainder form); and what the engine's report says. The parent computes the same in this
(single) process, and checks the values against dense float64 torch.
"""

from __future__ import annotations

from pathlib import Path

import gpytorch
import pytest
import torch
from torch import Tensor

import structgp as sg
from structgp.covariance import AddedDiagonal, Diagonal, KernelOperator, ScaledIdentity, Sum
from structgp.covariance.local_rows import Search, rows_product
from structgp.distributed.rows import Rows
from structgp.inference.pivoted_cholesky import pivoted_cholesky_pivots
from tests.distributed.spawn import join, spawn

F64 = torch.float64
N, D = 157, 2
BLOCK = 16  # kernel tiles of BLOCK x BLOCK (the memory budget below): 10 row tiles, 5 on each rank (0:80, 80:157)
CG = {"method": "cg", "cg_tol": 1e-12, "num_probes": 6, "precond_rank": 15, "seed": 5,
      "memory_budget": 32 * BLOCK * BLOCK * 8}
PRECONDITIONERS = ("auto", "jacobi", "none")


def leaves() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "x": (torch.rand(N, D, generator=gen, dtype=F64) * 3).requires_grad_(),
        "raw_lengthscale": torch.tensor([[-0.4]], dtype=F64).requires_grad_(),
        "raw_outputscale": torch.tensor(0.3, dtype=F64).requires_grad_(),
        "noise": (0.05 + 0.1 * torch.rand(N, generator=gen, dtype=F64)).requires_grad_(),
        "rhs": torch.randn(2, N, generator=gen, dtype=F64).requires_grad_(),  # two vectors
    }


def rbf_operator(t: dict[str, Tensor]) -> AddedDiagonal:
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    return KernelOperator(kernel, t["x"], [t["raw_outputscale"], t["raw_lengthscale"]]) + Diagonal(t["noise"])


def matern_sum(t: dict[str, Tensor]) -> Sum:
    """``K_matern + (K_rbf + 0.1 I)``: a Sum (not base + noise), whose preconditioner reads ``diag(A)``."""
    matern = gpytorch.kernels.MaternKernel(nu=2.5).double()
    rbf = gpytorch.kernels.RBFKernel().double()
    inner = KernelOperator(rbf, t["x"], [t["raw_lengthscale"]]) + ScaledIdentity(torch.tensor(0.1, dtype=F64), N)
    return Sum(KernelOperator(matern, t["x"], [t["raw_lengthscale"] + 0.5]), inner)


def _grads(out: Tensor, t: dict[str, Tensor]) -> list[Tensor]:
    names = [k for k in t if t[k].requires_grad]
    return [g if g is not None else torch.zeros_like(t[k])
            for k, g in zip(names, torch.autograd.grad(out, [t[k] for k in names], allow_unused=True))]


def evaluate() -> dict[str, object]:
    """Everything the test compares (in one process, or on each rank)."""
    out: dict[str, object] = {}
    for kind in PRECONDITIONERS:
        t = leaves()
        with sg.settings(**CG, preconditioner=kind):
            inv_quad, logdet = sg.inference.inv_quad_logdet(rbf_operator(t), t["rhs"])
            out[f"{kind} notes"] = list(sg.last_report().notes)
        out[f"{kind} value"] = torch.stack([inv_quad.sum().detach(), logdet.detach()])
        out[f"{kind} grads"] = _grads(inv_quad.sum() + logdet, t)
    t = leaves()
    with sg.settings(**CG):
        logdet = sg.inference.logdet(rbf_operator(t))
        out["logdet"], out["logdet grads"] = logdet.detach(), _grads(logdet, t)
        t = leaves()
        solution = sg.inference.solve(rbf_operator(t), t["rhs"].mT)
        weights = torch.linspace(-1, 1, 2 * N, dtype=F64).reshape(N, 2)
        out["solve"], out["solve grads"] = solution.detach(), _grads((solution * weights).sum(), t)
        t = leaves()
        inv_quad, logdet = sg.inference.inv_quad_logdet(matern_sum(t), t["rhs"])
        out["sum value"] = torch.stack([inv_quad.sum().detach(), logdet.detach()])
        out["sum grads"] = _grads(inv_quad.sum() + logdet, t)
    with torch.no_grad(), sg.settings(**CG):
        op = rbf_operator(leaves()).base
        piv = pivoted_cholesky_pivots(op, 15, part=Rows.of(N, op.tile()[0]))
        out["pivots"], out["factor rows"], out["remainder"] = piv.pivots, piv.factor, piv.remainder
    return out


def _modified_search_directions() -> str:
    """The error of a backward whose product's search directions (saved as this rank's rows and gathered
    again in the backward) were modified in place after the product, or "" if none was raised."""
    t = leaves()
    with sg.settings(**CG):
        op = rbf_operator(t).base
        part = Rows.of(N, op.tile()[0])
        local = part.local(torch.randn(N, 3, generator=torch.Generator().manual_seed(2), dtype=F64)).clone()
        out = rows_product(op, Search(local, part))
        local.add_(1.0)
        try:
            torch.autograd.grad(out.sum(), [t["x"]])
        except RuntimeError as error:
            return str(error)
    return ""


def _session(rank: int, world: int, port: int, folder: str) -> None:
    join(rank, world, port, folder, timeout=60.0)
    out = evaluate()
    out["rows"] = Rows.of(N, BLOCK).parts
    out["modified"] = _modified_search_directions()
    torch.save(out, Path(folder, f"rank{rank}.pt"))
    sg.distributed.shutdown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(_session, tmp_path_factory.mktemp("partitioned"))


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    assert not sg.distributed.is_active()
    return evaluate()


def _close(a, b, key: str, tol: float = 1e-10) -> None:
    if isinstance(a, list):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            torch.testing.assert_close(u, v, rtol=tol, atol=tol * float(v.abs().max()), msg=f"{key} {i}")
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=key)


def test_each_rank_holds_its_whole_blocks_of_rows(ranks):
    assert [r["rows"] for r in ranks] == [((0, 5 * BLOCK), (5 * BLOCK, N))] * 2
    for r, out in enumerate(ranks):
        start, stop = out["rows"][r]
        assert f"vectors partitioned by rows over 2 processes (this rank: rows {start}:{stop})" in out["auto notes"]


def test_values_gradients_and_solves_equal_one_process(ranks, reference):
    keys = [k for k in reference if "notes" not in k and k not in ("pivots", "factor rows", "remainder")]
    for out in ranks:
        for key in keys:
            # the Sum (a weak preconditioner, a remainder diagonal near its floor) is sensitive to rounding:
            # one process's own log-det moves by 2.7e-9 and its gradient by 1.1e-8 of its largest entry when x
            # moves by 1e-15 relative (measured); the others by less than 1e-10
            _close(out[key], reference[key], key, 1e-7 if key.startswith("sum") else 1e-10)
    # the tested gradients are not trivially zero, in every leaf (a test that can fail)
    used = {"auto grads": range(5), "solve grads": range(5), "logdet grads": range(4), "sum grads": (0, 1, 4)}
    for key, which in used.items():  # x, raw lengthscale, raw outputscale, noise, rhs (where the call uses them)
        assert all(float(reference[key][i].abs().max()) > 1e-6 for i in which), key


def test_the_pivoted_cholesky_is_one_process_s_split_by_rows(ranks):
    with torch.no_grad(), sg.settings(**CG):
        op = rbf_operator(leaves()).base
        whole = pivoted_cholesky_pivots(op, 15)
    for r, out in enumerate(ranks):
        start, stop = out["rows"][r]
        assert torch.equal(out["pivots"], whole.pivots)  # bitwise: the same pivots, the same rows of L
        assert torch.equal(out["factor rows"], whole.factor[start:stop])
        assert torch.equal(out["remainder"], whole.remainder[start:stop])


def test_the_ranks_agree_bitwise(ranks):
    for key, value in ranks[0].items():
        if isinstance(value, Tensor) and key not in ("factor rows", "remainder"):
            assert torch.equal(value, ranks[1][key]), key
        elif isinstance(value, list) and value and isinstance(value[0], Tensor):
            assert all(torch.equal(a, b) for a, b in zip(value, ranks[1][key])), key


def test_a_product_saves_its_rows_of_the_search_directions(ranks):
    # the gathered directions are saved as this rank's rows themselves (gathered again in the backward), not
    # as a gathered copy: an in-place change of the rows after the product must be caught there
    for out in ranks:
        assert "modified in place before its backward" in out["modified"]


def test_the_reference_is_dense_torch(reference):
    t = leaves()
    dense = rbf_operator(t).to_dense()
    rhs = t["rhs"].detach().mT
    exact = torch.stack([(rhs * torch.linalg.solve(dense, rhs)).sum(), torch.linalg.slogdet(dense)[1]]).detach()
    for kind in PRECONDITIONERS:  # the solve to cg_tol; SLQ within 4 of its reported standard errors
        torch.testing.assert_close(reference[f"{kind} value"][0], exact[0], rtol=1e-9, atol=0)
        note = next(n for n in reference[f"{kind} notes"] if "logdet standard error" in n)
        stderr = float(note.rsplit(" ", 1)[1])
        assert abs(float(reference[f"{kind} value"][1] - exact[1])) <= 4 * stderr, (kind, stderr)
    torch.testing.assert_close(reference["solve"], torch.linalg.solve(dense, rhs).detach(), rtol=1e-8, atol=1e-10)
