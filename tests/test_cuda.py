"""The exact engines on CUDA agree with the CPU (skipped without a CUDA device)."""

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from tests.reference import F64, positive, spd

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = {
    "dense": lambda: Dense(spd(20)),
    "low_rank": lambda: LowRank(torch.randn(300, 8, dtype=F64)) + Diagonal(positive(300)),
    "kronecker": lambda: Kronecker(spd(6), spd(5), spd(4)) + ScaledIdentity(positive(), 120),
    "kronecker_diag": lambda: Kronecker(spd(6), spd(5)) + Kronecker(Diagonal(positive(6)), Diagonal(positive(5))),
}
SPECTRAL = {  # the spectral-root paths, forced (at these sizes the cost model may prefer the dense Cholesky)
    "kronecker_smooth_hetero": lambda: Kronecker(_rbf(16), _rbf(12), _rbf(10)) + Diagonal(positive(1920, low=0.02)),
    "ski_smooth": lambda: _ski_smooth(),
}


def _rbf(n: int, lengthscale: float = 0.6) -> torch.Tensor:
    """A smooth RBF factor, singular in float64 (the spectral-root paths)."""
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)


def _ski_smooth():
    from structgp.covariance import SparseLifted

    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(400).repeat_interleave(4)
    cols = torch.randint(0, 400, (1600,), generator=gen)
    lift = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.rand(1600, generator=gen, dtype=F64), (400, 400))
    return SparseLifted(lift.coalesce(), Kronecker(_rbf(20), _rbf(20))) + ScaledIdentity(positive(), 400)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(name, dtype):
    cpu = CASES[name]().to(dtype)
    gpu = cpu.to("cuda")
    assert gpu.device.type == "cuda"
    y = torch.randn(cpu.n, dtype=dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    q_c, l_c = cpu.inv_quad_logdet(y)
    q_g, l_g = gpu.inv_quad_logdet(y.cuda())
    torch.testing.assert_close(q_g.cpu(), q_c, **tol)
    torch.testing.assert_close(l_g.cpu(), l_c, **tol)
    torch.testing.assert_close(gpu.solve(y.cuda()).cpu(), cpu.solve(y), **tol)
    r = gpu.root()
    assert (r @ torch.randn(r.shape[-1], dtype=dtype, device="cuda")).device.type == "cuda"
    assert sg.plan(gpu).method == sg.plan(cpu).method


@pytest.mark.parametrize("name", sorted(SPECTRAL))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_spectral_root_paths_match_cpu(name, dtype):
    cpu = SPECTRAL[name]().to(dtype)
    gpu = cpu.to("cuda")
    y = torch.randn(cpu.n, dtype=dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    with sg.settings(method="woodbury"):
        q_c, l_c = cpu.inv_quad_logdet(y)
        q_g, l_g = gpu.inv_quad_logdet(y.cuda())
        assert "spectral root" in str(sg.last_report())
        torch.testing.assert_close(gpu.solve(y.cuda()).cpu(), cpu.solve(y), **tol)
    torch.testing.assert_close(q_g.cpu(), q_c, **tol)
    torch.testing.assert_close(l_g.cpu(), l_c, **tol)
