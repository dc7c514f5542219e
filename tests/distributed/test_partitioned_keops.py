"""KeOps products across 2 gloo ranks against one process (skipped without pykeops).

The gathered product (``KernelOperator @ v`` with ``backend="keops"``: each rank reduces its rows, the rows
are all-gathered, the gradients' shares summed) and the partitioned iterative engine on a KeOps kernel
(each rank's rows of every PCG vector, :mod:`structgp.inference.partitioned`), value and gradients in
float64, against the same calls in one process and against the torch backend's dense kernel."""

from __future__ import annotations

from pathlib import Path

import gpytorch
import pytest
import torch
from torch import Tensor

import structgp as sg
from structgp.covariance import Diagonal, KernelOperator
from structgp.covariance.keops_backend import keops_available
from tests.distributed.spawn import join, spawn

pytestmark = pytest.mark.skipif(not keops_available(), reason="pykeops is not installed")

F64 = torch.float64
N, D = 157, 2
CG = {"method": "cg", "cg_tol": 1e-12, "num_probes": 6, "precond_rank": 15, "seed": 5}


def leaves() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(12)
    return {
        "x": (torch.rand(N, D, generator=gen, dtype=F64) * 3).requires_grad_(),
        "raw_outputscale": torch.tensor(0.3, dtype=F64).requires_grad_(),
        "raw_lengthscale": torch.tensor([[-0.4]], dtype=F64).requires_grad_(),
        "noise": (0.05 + 0.1 * torch.rand(N, generator=gen, dtype=F64)).requires_grad_(),
        "v": torch.randn(N, 3, generator=gen, dtype=F64).requires_grad_(),
    }


def kernel_op(t: dict[str, Tensor], backend: str) -> KernelOperator:
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5)).double()
    return KernelOperator(kernel, t["x"], [t["raw_outputscale"], t["raw_lengthscale"]], backend=backend)


def _grads(out: Tensor, t: dict[str, Tensor]) -> list[Tensor]:
    return [g if g is not None else torch.zeros_like(t[k])
            for k, g in zip(t, torch.autograd.grad(out, list(t.values()), allow_unused=True))]


def evaluate(backend: str = "keops") -> dict[str, object]:
    out: dict[str, object] = {}
    t = leaves()
    product = kernel_op(t, backend) @ t["v"]
    weights = torch.linspace(-1, 1, product.numel(), dtype=F64).reshape(product.shape)
    out["product"], out["product grads"] = product.detach(), _grads((product * weights).sum(), t)
    t = leaves()
    with sg.settings(**CG):
        inv_quad, logdet = sg.inference.inv_quad_logdet(kernel_op(t, backend) + Diagonal(t["noise"]), t["v"].mT)
        out["notes"] = list(sg.last_report().notes)
    out["value"] = torch.stack([inv_quad.sum().detach(), logdet.detach()])
    out["grads"] = _grads(inv_quad.sum() + logdet, t)
    return out


def _session(rank: int, world: int, port: int, folder: str) -> None:
    join(rank, world, port, folder, timeout=120.0)
    torch.save(evaluate(), Path(folder, f"rank{rank}.pt"))
    sg.distributed.shutdown()


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    assert not sg.distributed.is_active()
    return evaluate()  # also compiles the formulas once, before the ranks load them


@pytest.fixture(scope="module")
def ranks(reference, tmp_path_factory) -> list[dict]:
    return spawn(_session, tmp_path_factory.mktemp("keops"))


def _close(a, b, key: str, tol: float) -> None:
    if isinstance(a, list):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            torch.testing.assert_close(u, v, rtol=tol, atol=tol * float(v.abs().max()), msg=f"{key} {i}")
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=key)


def test_keops_product_and_engine_equal_one_process(ranks, reference):
    for out in ranks:
        for key in ("product", "product grads", "value", "grads"):
            _close(out[key], reference[key], key, 1e-10)
    for out, rows in zip(ranks, ("0:79", "79:157")):  # the engine ran partitioned: each rank on its rows
        assert f"vectors partitioned by rows over 2 processes (this rank: rows {rows})" in out["notes"], out["notes"]
    # every leaf's gradient is used (a test that can fail); the product does not use the noise (leaf 3)
    for key, which in (("product grads", (0, 1, 2, 4)), ("grads", range(5))):
        assert all(float(reference[key][i].abs().max()) > 1e-6 for i in which), key


def test_one_process_keops_equals_the_torch_backend(reference):
    torch_backend = evaluate("torch")
    _close(reference["product"], torch_backend["product"], "product", 1e-10)
    _close(reference["product grads"], torch_backend["product grads"], "product grads", 1e-8)
