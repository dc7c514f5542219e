"""Pyro's conventions for a distribution, checked for structgp's MultivariateNormal against Pyro's own
``dist.MultivariateNormal`` on the dense covariance: shapes, ``infer_shapes``, ``expand``, ``log_prob``,
reparameterised samples (moments and Pyro's goodness-of-fit test), ``support``, ``to_event``, ``mask``,
``score_parts``, and sample sites under ``pyro.plate`` (also inside enumeration, which it is not part of)."""

from __future__ import annotations

import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer import config_enumerate
from torch.distributions import constraints

from structgp.covariance import Dense, Diagonal, Kronecker, LowRank, ScaledIdentity
from structgp.distributions import MultivariateNormal
from tests.reference import F64, positive, spd

TEST_FAILURE_RATE = 1 / 50  # goodness-of-fit p-values below this fail (a 1-in-50 chance for a correct sampler)

COVARIANCES = {
    "kron+scaled": lambda: Kronecker(spd(2, seed=1), spd(3, seed=2)) + ScaledIdentity(0.2, 6),
    "lowrank+diag": lambda: LowRank(torch.randn(6, 2, dtype=F64)) + Diagonal(positive(6)),
    "dense batched (2,)": lambda: Dense(spd(6, 2, seed=3)),
}


def _pyro(d: MultivariateNormal) -> pdist.MultivariateNormal:
    """Pyro's MultivariateNormal with the same parameters (dense covariance)."""
    return pdist.MultivariateNormal(d.loc, d._unbroadcasted_covariance.to_dense())


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def test_is_a_pyro_distribution_with_pyro_mvn_metadata():
    d = MultivariateNormal(torch.zeros(6, dtype=F64), COVARIANCES["kron+scaled"]())
    reference = _pyro(d)
    assert isinstance(d, TorchDistribution)
    assert d.event_dim == reference.event_dim == 1
    assert d.support is constraints.real_vector and d.support.event_dim == reference.support.event_dim
    assert d.arg_constraints["loc"] is reference.arg_constraints["loc"]
    assert d.has_rsample and not d.has_enumerate_support
    with pytest.raises(NotImplementedError):
        d.enumerate_support()


@pytest.mark.parametrize("loc_batch", [(), (2,), (4, 1)], ids=str)
@pytest.mark.parametrize("case", COVARIANCES)
def test_shapes_match_pyro(case, loc_batch):
    d = MultivariateNormal(torch.randn(*loc_batch, 6, dtype=F64), COVARIANCES[case]())
    reference = _pyro(d)
    assert d.batch_shape == reference.batch_shape and d.event_shape == reference.event_shape == (6,)
    for sample_shape in ((), (5,), (2, 3)):
        x = d.sample(sample_shape)
        assert x.shape == d.shape(sample_shape) == reference.shape(sample_shape)
        assert d.log_prob(x).shape == reference.log_prob(x).shape == sample_shape + d.batch_shape


@pytest.mark.parametrize(
    ("loc", "covariance"), [((6,), (6, 6)), ((3, 6), (6, 6)), ((6,), (2, 6, 6)), ((4, 1, 6), (2, 6, 6))], ids=str
)
def test_infer_shapes_matches_pyro_and_the_instance(loc, covariance):
    batch, event = MultivariateNormal.infer_shapes(loc, covariance)
    assert (tuple(batch), tuple(event)) == tuple(map(tuple, pdist.MultivariateNormal.infer_shapes(loc, covariance)))
    d = MultivariateNormal(torch.zeros(loc, dtype=F64), Dense(spd(6, *covariance[:-2], seed=4)))
    assert (d.batch_shape, d.event_shape) == (batch, event)
    assert MultivariateNormal.infer_shapes(loc) == (torch.Size(loc[:-1]), torch.Size(loc[-1:]))


@pytest.mark.parametrize("case", COVARIANCES)
def test_log_prob_matches_pyro(case):
    d = MultivariateNormal(torch.randn(3, 1, 6, dtype=F64), COVARIANCES[case]())
    x = torch.randn(5, *d.batch_shape, 6, dtype=F64)
    torch.testing.assert_close(d.log_prob(x), _pyro(d).log_prob(x), rtol=1e-10, atol=1e-10)
    broadcast = torch.randn(6, dtype=F64)  # a value broadcast against the batch
    torch.testing.assert_close(d.log_prob(broadcast), _pyro(d).log_prob(broadcast), rtol=1e-10, atol=1e-10)


def test_expand_shares_the_covariance_and_matches_pyro():
    d = MultivariateNormal(torch.randn(6, dtype=F64), COVARIANCES["lowrank+diag"]())
    expanded = d.expand((4, 3))
    assert type(expanded) is MultivariateNormal and expanded.batch_shape == (4, 3)
    assert expanded._unbroadcasted_covariance is d._unbroadcasted_covariance
    again = expanded.expand((2, 4, 3))
    assert again.batch_shape == (2, 4, 3)
    x = torch.randn(2, 4, 3, 6, dtype=F64)
    torch.testing.assert_close(again.log_prob(x), _pyro(d).expand((2, 4, 3)).log_prob(x), rtol=1e-10, atol=1e-10)
    assert again.sample((5,)).shape == (5, 2, 4, 3, 6)
    with pytest.raises(ValueError, match="batch_shape"):
        expanded.expand((5,))


@pytest.mark.parametrize("case", COVARIANCES)
def test_rsample_moments_goodness_of_fit_and_gradients(case):
    loc = torch.randn(6, dtype=F64, requires_grad=True)
    d = MultivariateNormal(loc, COVARIANCES[case]())
    num = 20000
    x = d.rsample((num,))
    dense = d.covariance_matrix
    centred = (x - loc).detach()
    assert (centred.mean(0).abs() <= 5 * dense.diagonal(dim1=-2, dim2=-1).sqrt() / num**0.5).all()
    empirical = torch.einsum("s...i,s...j->...ij", centred, centred) / num
    scale = (dense.diagonal(dim1=-2, dim2=-1)[..., :, None] * dense.diagonal(dim1=-2, dim2=-1)[..., None, :]).sqrt()
    assert ((empirical - dense).abs() <= 6 * scale * (2 / num) ** 0.5).all()
    x.sum().backward()  # reparameterised: d x / d loc = I per draw
    torch.testing.assert_close(loc.grad, torch.full((6,), float(num * d.batch_shape.numel()), dtype=F64))
    # Pyro's goodness-of-fit test on 1-d statistics of the whitened draws z = L^{-1} (x - loc) of one batch
    # member (its nearest-neighbour density test in 6 or even 2 correlated dims is biased, also for Pyro's
    # own MVN): |z|^2 ~ chi^2(6) checks the joint law radially, u^T z ~ N(0, 1) a random direction
    tril = torch.linalg.cholesky(dense.reshape(-1, 6, 6)[0])
    draws = d.sample((2000,)).reshape(2000, -1, 6)[:, 0] - d.loc.detach().reshape(-1, 6)[0]
    z = torch.linalg.solve_triangular(tril, draws.T, upper=False).T
    radius = z.square().sum(-1)
    assert auto_goodness_of_fit(radius, torch.distributions.Chi2(6.0).log_prob(radius).exp()) > TEST_FAILURE_RATE
    u = torch.nn.functional.normalize(torch.randn(6, dtype=F64), dim=0)
    projection = z @ u
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(projection).exp()
    assert auto_goodness_of_fit(projection, normal) > TEST_FAILURE_RATE


def test_to_event_matches_pyro():
    d = MultivariateNormal(torch.randn(2, 3, 6, dtype=F64), COVARIANCES["kron+scaled"]())
    independent = d.to_event(1)
    reference = _pyro(d).to_event(1)
    assert independent.batch_shape == reference.batch_shape == (2,)
    assert independent.event_shape == reference.event_shape == (3, 6)
    x = torch.randn(4, 2, 3, 6, dtype=F64)
    torch.testing.assert_close(independent.log_prob(x), reference.log_prob(x), rtol=1e-10, atol=1e-10)
    assert independent.rsample((4,)).shape == x.shape


def test_mask_matches_pyro():
    d = MultivariateNormal(torch.randn(3, 6, dtype=F64), COVARIANCES["lowrank+diag"]())
    mask = torch.tensor([True, False, True])
    x = torch.randn(3, 6, dtype=F64)
    value = d.mask(mask).log_prob(x)
    torch.testing.assert_close(value, _pyro(d).mask(mask).log_prob(x), rtol=1e-10, atol=1e-10)
    assert value[1] == 0 and value[0] != 0
    assert (d.mask(False).log_prob(x) == 0).all()


def test_score_parts_are_reparameterised():
    d = MultivariateNormal(torch.zeros(6, dtype=F64), COVARIANCES["kron+scaled"]())
    x = d.rsample((3,))
    parts = d.score_parts(x)
    torch.testing.assert_close(parts.log_prob, _pyro(d).log_prob(x))
    reference = _pyro(d).score_parts(x)
    assert parts.score_function == reference.score_function == 0  # reparameterised: no score-function term
    torch.testing.assert_close(parts.entropy_term, reference.entropy_term)


def _model(cov, dims=(-1,), sizes=(5,)):
    loc = torch.zeros(6, dtype=F64)
    with pyro.plate("outer", sizes[0], dim=dims[0]):
        if len(sizes) == 1:
            return pyro.sample("f", MultivariateNormal(loc, cov))
        with pyro.plate("inner", sizes[1], dim=dims[1]):
            return pyro.sample("f", MultivariateNormal(loc, cov))


@pytest.mark.parametrize(("dims", "sizes"), [((-1,), (5,)), ((-2, -1), (3, 4))], ids=["one plate", "nested plates"])
def test_sample_site_under_plates(dims, sizes):
    cov = COVARIANCES["kron+scaled"]()
    trace = pyro.poutine.trace(_model).get_trace(cov, dims, sizes)
    trace.compute_log_prob()
    site = trace.nodes["f"]
    assert site["value"].shape == (*sizes, 6) and site["fn"].batch_shape == sizes
    assert site["fn"]._unbroadcasted_covariance is cov  # the plate expands, sharing one covariance
    expected = pdist.MultivariateNormal(torch.zeros(6, dtype=F64), cov.to_dense()).log_prob(site["value"])
    torch.testing.assert_close(site["log_prob"], expected, rtol=1e-10, atol=1e-10)


def test_site_is_not_enumerated_inside_an_enumerated_model():
    """Under ``config_enumerate`` and ``poutine.enum`` a discrete site gets an enumeration dim; the
    MultivariateNormal site (no enumerable support) is sampled as usual, and TraceEnum_ELBO runs."""
    cov = COVARIANCES["lowrank+diag"]()
    locs = torch.randn(2, 6, dtype=F64)
    data = torch.randn(5, 6, dtype=F64)

    @config_enumerate
    def model():
        with pyro.plate("data", 5, dim=-1):
            z = pyro.sample("z", pdist.Categorical(torch.tensor([0.3, 0.7], dtype=F64)))
            pyro.sample("f", MultivariateNormal(locs[z], cov))
            pyro.sample("y", MultivariateNormal(locs[z], cov), obs=data)

    enumerated = pyro.poutine.enum(model, first_available_dim=-2)
    trace = pyro.poutine.trace(enumerated).get_trace()
    assert trace.nodes["z"]["value"].shape == (2, 1) and trace.nodes["z"]["infer"]["_enumerate_dim"] == -2
    assert trace.nodes["f"]["value"].shape == (2, 5, 6) and "_enumerate_dim" not in trace.nodes["f"]["infer"]

    def guide():
        with pyro.plate("data", 5, dim=-1):
            pyro.sample("f", MultivariateNormal(pyro.param("m", torch.zeros(6, dtype=F64)), cov))

    loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide)
    loss.backward()
    assert torch.isfinite(loss) and pyro.param("m").grad.abs().sum() > 0
