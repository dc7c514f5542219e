"""Stochastic Lanczos quadrature: Gauss quadrature, the control variate, unbiasedness."""

import torch

from structgp.inference.cg import pcg
from structgp.inference.iterative import rademacher
from structgp.inference.preconditioners import Identity, Jacobi, LowRankDiagonal
from structgp.inference.slq import lanczos_quadrature, slq_logdet
from tests.reference import F64


def _tridiag(diag, off):
    return torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def test_quadrature_is_e1_f_e1():
    diag = torch.rand(4, 7, dtype=F64) + 2
    off = torch.rand(4, 6, dtype=F64) * 0.5
    t = _tridiag(diag, off)
    e, v = torch.linalg.eigh(t)
    for fn in (torch.log, torch.sqrt):
        ref = ((v * fn(e).unsqueeze(-2)) @ v.mT)[..., 0, 0]
        torch.testing.assert_close(lanczos_quadrature(diag, off, fn), ref)
    assert lanczos_quadrature(diag[..., :0], off[..., :0], torch.log).shape == (4,)


def test_identity_padding_leaves_quadrature_unchanged():
    diag, off = torch.rand(6, dtype=F64) + 2, torch.rand(5, dtype=F64)
    padded_d = torch.cat([diag, torch.ones(4, dtype=F64)])
    padded_o = torch.cat([off, torch.zeros(4, dtype=F64)])
    torch.testing.assert_close(
        lanczos_quadrature(padded_d, padded_o, torch.log), lanczos_quadrature(diag, off, torch.log)
    )


def _kernel_problem(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, dtype=F64, generator=gen)
    k = torch.exp(-0.5 * torch.cdist(x, x).square() / 0.1**2)
    noise = torch.rand(n, dtype=F64, generator=gen) * 0.05 + 0.05
    return k, noise


def _slq(a, precond, probes, seed):
    z = precond.root_matmul(rademacher((a.shape[-1], probes), a, seed))
    res = pcg(lambda v: a @ v, z, precond.solve, tol=1e-10, max_iter=500)
    return slq_logdet(res, slice(0, None), precond.logdet())


def test_exact_preconditioner_gives_exact_logdet():
    k, noise = _kernel_problem()
    e, q = torch.linalg.eigh(k)
    factor = q * e.clamp_min(0).sqrt()  # L L^T = K exactly
    a = k + torch.diag(noise)
    est, stderr = _slq(a, LowRankDiagonal(factor, noise, "exact"), 8, seed=0)
    torch.testing.assert_close(est, torch.linalg.slogdet(a)[1], rtol=1e-10, atol=1e-8)
    assert float(stderr) < 1e-6


def test_unbiased_and_standard_error_is_honest():
    k, noise = _kernel_problem(n=120)
    a = k + torch.diag(noise)
    exact = torch.linalg.slogdet(a)[1]
    ests, errs = zip(*(_slq(a, Jacobi(a.diagonal()), 8, seed) for seed in range(40)))
    ests, errs = torch.stack(ests), torch.stack(errs)
    spread = ests.std()
    assert float((ests.mean() - exact).abs()) < 4 * float(spread) / 40**0.5
    # the reported standard error estimates the spread of the estimate across seeds
    assert 0.5 < float(errs.mean() / spread) < 2.0


def test_control_variate_cuts_the_variance():
    k, noise = _kernel_problem()
    a = k + torch.diag(noise)
    exact = torch.linalg.slogdet(a)[1]
    e, q = torch.linalg.eigh(k)
    top = q[:, -20:] * e[-20:].sqrt()  # a decent rank-20 part
    none = torch.stack([_slq(a, Identity(a, torch.Size()), 16, s)[0] for s in range(6)])
    low_rank = torch.stack([_slq(a, LowRankDiagonal(top, noise, "top"), 16, s)[0] for s in range(6)])
    assert float((low_rank - exact).abs().max()) < 0.1 * float((none - exact).abs().max())
