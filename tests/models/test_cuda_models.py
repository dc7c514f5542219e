"""Models on CUDA agree with the CPU (skipped without a CUDA device)."""

import copy

import pytest
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.kernels import GridKernel, GroupKernel, InducingPointKernel, InterpolationKernel, MultitaskKernel
from structgp.models import ExactGP
from tests.reference import F64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _grid():
    axes = [torch.linspace(0, 1, 6, dtype=F64), torch.linspace(0, 1, 5, dtype=F64)]
    x = torch.cartesian_prod(*axes)
    noise = 0.01 + 0.1 * x[:, 0]
    return ExactGP(x, torch.sin(3 * x).sum(-1), GridKernel([ScaleKernel(RBFKernel()), RBFKernel()], axes),
                   likelihood=FixedNoiseGaussianLikelihood(noise)), torch.rand(4, 2, dtype=F64)


def _ski():
    x = torch.rand(40, 2, dtype=F64)
    axes = [torch.linspace(-0.3, 1.3, 10, dtype=F64)] * 2
    return ExactGP(x, torch.sin(3 * x).sum(-1), InterpolationKernel([RBFKernel(), RBFKernel()], axes)), x[:4]


def _inducing():
    x = torch.rand(60, 2, dtype=F64)
    kernel = InducingPointKernel(ScaleKernel(RBFKernel()), x[:6], method="fitc")
    return ExactGP(x, torch.sin(3 * x).sum(-1), kernel), torch.rand(4, 2, dtype=F64)


def _group():
    x = torch.cat([torch.rand(9, 1, dtype=F64), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2], dtype=F64)[:, None]], -1)
    return ExactGP(x, torch.randn(9, dtype=F64), GroupKernel(RBFKernel())), x[:3]


def _multitask():
    x = torch.rand(8, 2, dtype=F64)
    return ExactGP(x, torch.randn(8, 3, dtype=F64), MultitaskKernel(RBFKernel(), 3)), x[:3]


@pytest.mark.parametrize("build", [_grid, _ski, _inducing, _group, _multitask])
def test_cuda_matches_cpu(build):
    cpu, xt = build()
    gpu = copy.deepcopy(cpu).to("cuda")
    tol = dict(rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gpu.marginal_log_likelihood().cpu(), cpu.marginal_log_likelihood(), **tol)
    for a, b in zip(gpu.predict(xt.cuda()), cpu.predict(xt)):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu(), b, **tol)
    assert gpu.sample(xt.cuda(), (2,)).device.type == "cuda"
    history = gpu.fit(iterations=2, progress=False)
    assert history[-1] <= history[0]
