"""The Gram spectrum of a low-rank factor against torch.linalg.eigh of the dense float64 W W^T."""

import torch

from structgp.inference.gram_spectrum import gram_spectrum
from tests.reference import F64, assert_close


def test_values_and_eigenvectors_of_w_w_transpose():
    w = torch.randn(2, 9, 4, dtype=F64)
    gram = gram_spectrum(w)
    dense = w @ w.mT
    assert gram.values.shape == (2, 4) and gram.values.dtype == F64
    assert_close(gram.values, torch.linalg.eigvalsh(dense)[..., -4:])  # the nonzero eigenvalues, ascending
    u = gram.eigenvectors(gram.vectors, gram.values)  # (2, 9, 4)
    assert_close(u.mT @ u, torch.eye(4, dtype=F64).expand(2, 4, 4))
    assert_close(dense @ u, u * gram.values.unsqueeze(-2))


def test_spectral_matmul_is_w_v_diag_v_t_w_t():
    w = torch.randn(7, 3, dtype=F64)
    gram = gram_spectrum(w)
    h = torch.rand(3, dtype=F64)
    x = torch.randn(7, 2, dtype=F64)
    v = gram.vectors
    assert_close(gram.spectral_matmul(h, x), w @ v @ torch.diag(h) @ v.mT @ w.mT @ x)
    s = 0.3  # f(W W^T + s I) = f(s) I + W V h(mu) V^T W^T with h(mu) = (f(mu + s) - f(s)) / mu
    h_sqrt = ((gram.values + s).sqrt() - s**0.5) / gram.values
    ref = torch.linalg.eigh(w @ w.mT + s * torch.eye(7, dtype=F64))
    root = ref.eigenvectors @ torch.diag(ref.eigenvalues.sqrt()) @ ref.eigenvectors.mT
    assert_close(s**0.5 * x + gram.spectral_matmul(h_sqrt, x), root @ x)


def test_rank_deficient_factor_has_no_negative_eigenvalues():
    a = torch.randn(8, 2, dtype=F64)
    w = torch.cat([a, a @ torch.randn(2, 3, dtype=F64)], dim=-1)  # rank 2 of 5 columns
    gram = gram_spectrum(w)
    assert float(gram.values.min()) >= 0
    assert_close(gram.values[:3], torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    assert_close(gram.values[3:], torch.linalg.eigvalsh(w @ w.mT)[-2:])


def test_float32_factor():
    w = torch.randn(12, 3, dtype=F64)
    exact = gram_spectrum(w.float())  # the product in float64 from the float32 entries
    assert exact.factor.dtype == F64 and exact.values.dtype == F64
    assert_close(exact.values, torch.linalg.eigvalsh(w.float().double().mT @ w.float().double()))
    cheap = gram_spectrum(w.float(), product_in_float64=False)  # the product in float32
    assert cheap.factor.dtype == torch.float32 and cheap.values.dtype == F64
    assert_close(cheap.values, exact.values, rtol=1e-5, atol=1e-5)
    assert gram_spectrum(w).to(torch.float32).vectors.dtype == torch.float32


def test_gradients_flow_through_the_decomposition():
    w = torch.randn(6, 3, dtype=F64, requires_grad=True)
    weights = torch.arange(3, dtype=F64) + 1.0

    def f(w):
        return (gram_spectrum(w).values * weights).sum()

    assert torch.autograd.gradcheck(f, (w,))
    ref = torch.autograd.grad((torch.linalg.eigvalsh(w @ w.mT)[-3:] * weights).sum(), w)[0]
    assert_close(torch.autograd.grad(f(w), w)[0], ref)
