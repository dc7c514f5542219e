"""Kronecker factor spectra against torch.linalg.eigh of the dense float64 Kronecker product."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import structgp as sg
from structgp.covariance import Kronecker, ScaledIdentity
from structgp.covariance.kron import kron_dense
from structgp.inference.cholesky import NotPositiveDefiniteError
from structgp.inference.eigsh import eigsh
from structgp.inference.kronecker_spectrum import (
    cached_kronecker_spectra,
    eigenvector_columns,
    factor_spectra,
    from_eigenbasis,
    kronecker_spectra,
    spectral_matmul,
    to_eigenbasis,
)
from structgp.inference.matrix_functions import sqrt_matmul
from structgp.inference.spectral_root import spectral_root
from tests.reference import F64, assert_close, spd


class CountEigh(TorchDispatchMode):
    """Counts the symmetric eigendecompositions dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._linalg_eigh, torch.ops.aten.linalg_eigh):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def rbf(n: int, lengthscale: float) -> torch.Tensor:
    """An RBF Gram matrix on ``n`` points of [0, 1]: singular to working precision for long lengthscales."""
    x = torch.linspace(0, 1, n, dtype=F64)
    return torch.exp(-0.5 * (x[:, None] - x[None, :]).square() / lengthscale**2)


def test_eigenpairs_reproduce_the_dense_product():
    op = Kronecker(spd(3, 2), spd(4), spd(2))  # batched first factor
    spectra = kronecker_spectra(op)
    dense = op.to_dense()
    lam = spectra.eigenvalues()
    assert lam.shape == (2, 24) and lam.dtype == F64
    assert_close(lam.sort(-1).values, torch.linalg.eigvalsh(dense))
    eye = torch.eye(24, dtype=F64)
    assert_close(spectral_matmul(spectra.vectors, lam, eye), dense)
    x = torch.randn(2, 24, 3, dtype=F64)
    assert_close(from_eigenbasis(spectra.vectors, to_eigenbasis(spectra.vectors, x)), x)
    q = kron_dense(spectra.vectors)
    assert_close(to_eigenbasis(spectra.vectors, x), q.mT @ x)


def test_eigenvector_columns_pick_columns_of_the_product():
    spectra = kronecker_spectra(Kronecker(spd(3, 2), spd(4), spd(2)))
    index = torch.tensor([[0, 7, 23], [5, 12, 1]])
    scale = torch.rand(2, 3, dtype=F64) + 0.5
    q = kron_dense(spectra.vectors)
    ref = q.gather(-1, index.unsqueeze(-2).expand(2, 24, 3))
    assert_close(eigenvector_columns(spectra.vectors, index), ref)
    assert_close(eigenvector_columns(spectra.vectors, index, scale), ref * scale.unsqueeze(-2))


def test_second_call_hits_the_cache():
    op = Kronecker(spd(3), spd(4), spd(5))
    with CountEigh() as first:
        spectra = kronecker_spectra(op)
    assert first.calls == 3  # one per factor
    with CountEigh() as again:
        assert kronecker_spectra(op) is spectra
        raw = kronecker_spectra(op, psd=False)
        eigsh(op, 2)
        sqrt_matmul(op + ScaledIdentity(0.1, 60), torch.randn(60, 1, dtype=F64))
        spectral_root(op)
        with sg.settings(method="eigen"):
            (op + ScaledIdentity(0.1, 60)).logdet()
    assert again.calls == 0  # eigsh, matrix functions, the spectral root and the engine share it
    assert_close(raw.eigenvalues(), spectra.eigenvalues())


def test_in_place_change_invalidates_the_cache():
    a = spd(3)
    op = Kronecker(a, spd(2))
    before = kronecker_spectra(op)
    with torch.no_grad():
        a.mul_(2)
    assert cached_kronecker_spectra(op) is None
    after = kronecker_spectra(op)
    assert after is not before
    assert_close(after.eigenvalues(), 2 * before.eigenvalues())


def test_cached_spectra_computes_nothing():
    op = Kronecker(spd(3), spd(4))
    with CountEigh() as count:
        assert cached_kronecker_spectra(op) is None
        assert cached_kronecker_spectra(op, psd=False) is None
    assert count.calls == 0
    spectra = kronecker_spectra(op)
    assert cached_kronecker_spectra(op) is spectra
    assert cached_kronecker_spectra(op, psd=False) is kronecker_spectra(op, psd=False)


def test_not_psd_factor_is_named_and_raw_reading_is_kept():
    bad = spd(3) - 5 * torch.eye(3, dtype=F64)
    op = Kronecker(spd(4), bad)
    with pytest.raises(NotPositiveDefiniteError, match="Kronecker factor 1 is not positive semidefinite"):
        kronecker_spectra(op)
    raw = kronecker_spectra(op, psd=False)  # eigsh and matrix functions work on any symmetric factors
    assert_close(raw.eigenvalues().sort(-1).values, torch.linalg.eigvalsh(op.to_dense()))
    assert cached_kronecker_spectra(op) is None and cached_kronecker_spectra(op, psd=False) is raw
    with pytest.raises(NotPositiveDefiniteError, match="Kronecker factor 1 is not positive semidefinite"):
        kronecker_spectra(op)  # from the cache: the same error
    with pytest.raises(NotPositiveDefiniteError, match="the second matrix is not positive semidefinite"):
        factor_spectra([spd(4), bad], ["the first matrix", "the second matrix"])


def test_rounding_level_negatives_are_clamped_with_the_datas_precision():
    k32 = rbf(40, 0.3).float()  # float32 rounding: eigenvalues down to about -1e-7 of the largest
    raw = factor_spectra([k32], psd=False)
    assert float(raw.values[0].min()) < 0
    spectra = kronecker_spectra(Kronecker(k32, k32))
    assert all(lam.dtype == F64 and float(lam.min()) >= 0 for lam in spectra.values)
    assert_close(spectra.values[0], raw.values[0].clamp_min(0), rtol=0, atol=0)
    with pytest.raises(NotPositiveDefiniteError, match="Kronecker factor 0"):
        kronecker_spectra(Kronecker(k32.double(), k32.double()))  # the same values are not rounding in float64


def test_float32_factors_are_decomposed_in_float64():
    a, b = spd(5), spd(3)
    spectra = kronecker_spectra(Kronecker(a.float(), b.float()))
    assert all(t.dtype == F64 for t in spectra.values + spectra.vectors)
    ref = torch.linalg.eigvalsh(torch.kron(a, b))
    assert_close(spectra.eigenvalues().sort(-1).values, ref, rtol=1e-6, atol=1e-6)
    assert spectra.to(torch.float32).vectors[0].dtype == torch.float32


def test_differentiable_spectra_carry_the_graph_and_are_not_cached():
    a = spd(3).requires_grad_()
    b = spd(2)
    op = Kronecker(a, b)
    spectra = kronecker_spectra(op, differentiable=True)
    assert spectra.values[0].requires_grad
    assert cached_kronecker_spectra(op) is None
    weights = torch.arange(6, dtype=F64)  # distinct weights: a gradient that depends on the eigenvectors
    grad = torch.autograd.grad((spectra.eigenvalues().sort(-1).values * weights).sum(), a)[0]
    ref = torch.autograd.grad((torch.linalg.eigvalsh(torch.kron(a, b)) * weights).sum(), a)[0]
    assert_close(grad, ref)
    assert not kronecker_spectra(op).values[0].requires_grad  # the default reading is detached
    with torch.no_grad():
        assert not kronecker_spectra(op, differentiable=True).values[0].requires_grad
