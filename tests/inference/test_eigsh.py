"""eigsh / eigvalsh against torch.linalg.eigvalsh / eigh of the dense float64 matrix."""

import importlib

import pytest
import torch

import structgp as sg
from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.covariance.block_diag import BlockDiag
from structgp.inference.eigsh import eigsh, eigvalsh
from tests.reference import F64, assert_close, positive, spd

EXACT = {
    "kronecker": lambda: Kronecker(spd(3), spd(4), spd(2)),
    "kronecker_batched_noise": lambda: Kronecker(spd(3, 2), Dense(spd(4))) + ScaledIdentity(positive(2), 12),
    "diagonal": lambda: Diagonal(positive(2, 7)),
    "scaled_identity": lambda: ScaledIdentity(positive(3), 5),
    "diagonal_kronecker": lambda: Kronecker(Diagonal(positive(3)), Diagonal(positive(4))),
    "lowrank": lambda: LowRank(torch.randn(9, 3, dtype=F64)),
    "lowrank_noise": lambda: LowRank(torch.randn(2, 9, 3, dtype=F64)) + ScaledIdentity(0.2, 9),
    "dense": lambda: Dense(spd(10, 2)),
}


def check_pairs(op, pairs, k, largest, rtol=1e-8):
    a = op.to_dense()
    ref = torch.linalg.eigvalsh(a)
    ref = ref.flip(-1)[..., :k] if largest else ref[..., :k]
    assert pairs.eigenvalues.shape == (*op.batch_shape, k)
    assert pairs.eigenvectors.shape == (*op.batch_shape, op.n, k)
    scale = ref.abs().amax()
    assert_close(pairs.eigenvalues, ref, rtol, rtol * scale)
    v = pairs.eigenvectors
    assert_close(a @ v, v * pairs.eigenvalues.unsqueeze(-2), rtol, 10 * rtol * scale)
    assert_close(v.mT @ v, torch.eye(k, dtype=v.dtype).expand(*v.shape[:-2], k, k), rtol, 10 * rtol)


@pytest.mark.parametrize("name", list(EXACT))
@pytest.mark.parametrize("k", [1, 3])
def test_exact_structures(name, k):
    torch.manual_seed(0)
    op = EXACT[name]()
    check_pairs(op, eigsh(op, k), k, True)
    if name not in ("lowrank", "lowrank_noise"):
        check_pairs(op, eigsh(op, k, largest=False), k, False)
    assert_close(eigvalsh(op), torch.linalg.eigvalsh(op.to_dense()), 1e-9, 1e-9)
    assert_close(torch.linalg.eigvalsh(op), torch.linalg.eigvalsh(op.to_dense()), 1e-9, 1e-9)


def test_kronecker_is_exact_without_forming_the_matrix():
    factors = [spd(20) for _ in range(3)]  # N = 8000: the dense matrix would take 488 MiB
    op = Kronecker(*factors) + ScaledIdentity(torch.tensor(0.1, dtype=F64), 8000)
    with sg.settings(dense_limit=2**20):
        pairs = eigsh(op, 4)
        spectrum = eigvalsh(op)
    lam = [torch.linalg.eigvalsh(f) for f in factors]
    products = (lam[0][:, None, None] * lam[1][None, :, None] * lam[2][None, None, :]).flatten() + 0.1
    assert_close(pairs.eigenvalues, products.sort(descending=True).values[:4])
    assert_close(spectrum, products.sort().values)
    av = op @ pairs.eigenvectors
    assert_close(av, pairs.eigenvectors * pairs.eigenvalues, 1e-8, 1e-8)


def test_block_diag_spectrum():
    op = BlockDiag([spd(2), spd(3, 2), Diagonal(positive(2))])
    assert_close(eigvalsh(op), torch.linalg.eigvalsh(op.to_dense()), 1e-9, 1e-9)
    check_pairs(op, eigsh(op, 2), 2, True)


@pytest.fixture
def lanczos(monkeypatch):
    module = importlib.import_module("structgp.inference.eigsh")  # the package's `eigsh` is the function
    monkeypatch.setattr(module, "DENSE_N", 0)  # force block Lanczos on small operators


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("largest", [True, False])
def test_block_lanczos(lanczos, k, largest):
    torch.manual_seed(2)
    for op in (Dense(spd(60, 2)), Kronecker(spd(5), spd(8)) + Diagonal(positive(40))):
        check_pairs(op, eigsh(op, k, largest=largest, tol=1e-10), k, largest, rtol=1e-7)


def test_block_lanczos_repeated_eigenvalues(lanczos):
    q = torch.linalg.qr(torch.randn(50, 50, dtype=F64)).Q
    lam = torch.cat([torch.full((3,), 5.0, dtype=F64), torch.linspace(0.1, 2, 47, dtype=F64)])
    op = Dense(q @ torch.diag(lam) @ q.mT)
    pairs = eigsh(op, 3)  # a block of 3 resolves a triple eigenvalue
    assert_close(pairs.eigenvalues, torch.full((3,), 5.0, dtype=F64), 1e-8, 1e-8)
    check_pairs(op, pairs, 3, True, rtol=1e-7)
    pairs = eigsh(op, 5)
    check_pairs(op, pairs, 5, True, rtol=1e-7)


def test_block_lanczos_float32(lanczos):
    a = spd(80)
    pairs = eigsh(Dense(a.float()), 3)
    assert pairs.eigenvalues.dtype == torch.float32
    ref = torch.linalg.eigvalsh(a).flip(-1)[:3]
    assert_close(pairs.eigenvalues, ref, 1e-4, 1e-4)


def test_eigenvalue_gradients_match_dense(lanczos):
    x = spd(40).requires_grad_()
    pairs = eigsh(Dense(x), 2, tol=1e-12)
    g = torch.autograd.grad(pairs.eigenvalues.sum(), x)[0]
    ref = torch.autograd.grad(torch.linalg.eigvalsh(x).flip(-1)[:2].sum(), x)[0]
    assert_close((g + g.mT) / 2, (ref + ref.mT) / 2, 1e-6, 1e-8)


def test_gradcheck_exact_paths():
    def f(a, b, s, w):
        kron = eigsh(Kronecker(a, b) + ScaledIdentity(s, 6), 2)
        low = eigsh(LowRank(w) + ScaledIdentity(s, 5), 2)
        return kron.eigenvalues, kron.eigenvectors.abs(), low.eigenvalues, eigvalsh(Kronecker(a, b))

    ins = (spd(3).requires_grad_(), spd(2).requires_grad_(), positive().requires_grad_(),
           torch.randn(5, 2, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(f, ins)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 4\]"):
        eigsh(Dense(spd(4)), 5)
    with pytest.raises(TypeError, match="op: expected a structgp operator"):
        eigsh(spd(4), 2)
