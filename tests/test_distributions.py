"""The bar distribution with half-normal or Pareto tails (issue 5/7's head): density, CDF,
moments, quantiles, and the NLL of a fitted bar distribution against the density it fits."""

import math

import numpy as np
import pytest
import tensorflow as tf

from gpicl_tf.distributions import BarDistribution, borders_from_samples, check_levels

BORDERS = np.array([-2.0, -1.0, -0.3, 0.0, 0.5, 1.5, 3.0], np.float32)  # 6 unequal bins


def _logits(n=5, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(0, 1.5, (n, 6)), tf.float32)


TAILS = pytest.mark.parametrize("tail", ["normal", "pareto"])


def _grid(tail):
    """Integration points: to 30 units beyond the outer borders for half-normal tails; to
    1e7 for Pareto ones (index 3: the mass beyond is ~1e-19, the variance's share ~2e-6)."""
    if tail == "normal":
        return np.linspace(-30.0, 40.0, 400001).astype(np.float64)
    far = np.geomspace(1e-7, 1e7, 200000)
    inner = np.linspace(BORDERS[1], BORDERS[-2], 100001)[1:-1]
    return np.concatenate([BORDERS[1] - far[::-1], inner, BORDERS[-2] + far]).astype(np.float64)


@TAILS
def test_the_density_integrates_to_one_and_the_cdf_is_its_integral(tail):
    bars = BarDistribution(BORDERS, tail=tail)
    logits = _logits(3)
    y = _grid(tail)
    for i in range(3):
        li = tf.repeat(logits[i:i + 1], len(y), 0)
        dens = np.exp(bars.log_prob(li, tf.constant(y, tf.float32)).numpy().astype(np.float64))
        assert np.trapezoid(dens, y) == pytest.approx(1.0, abs=1e-4)
        cdf = bars.cdf(li, tf.constant(y, tf.float32)).numpy()
        numeric = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(y))])
        np.testing.assert_allclose(cdf[::1000], numeric[::1000], atol=2e-4)
        assert np.all(np.diff(cdf) >= -1e-6)


@TAILS
def test_mean_and_variance_equal_the_moments_of_the_density(tail):
    bars = BarDistribution(BORDERS, tail=tail)
    logits = _logits(4, seed=1)
    y = _grid(tail)
    mean, var = bars.mean(logits).numpy(), bars.variance(logits).numpy()
    for i in range(4):
        li = tf.repeat(logits[i:i + 1], len(y), 0)
        dens = np.exp(bars.log_prob(li, tf.constant(y, tf.float32)).numpy().astype(np.float64))
        m = np.trapezoid(dens * y, y)
        v = np.trapezoid(dens * (y - m) ** 2, y)
        assert mean[i] == pytest.approx(m, abs=2e-4)
        assert var[i] == pytest.approx(v, rel=1e-3)


@TAILS
def test_quantiles_are_monotone_in_the_level_and_invert_the_cdf(tail):
    bars = BarDistribution(BORDERS, tail=tail)
    logits = _logits(6, seed=2)
    levels = np.array([0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999], np.float32)
    qs = np.stack([bars.quantile(logits, lv).numpy() for lv in levels], -1)  # (6, L)
    assert np.all(np.diff(qs, axis=-1) > 0)
    for j, lv in enumerate(levels):  # CDF(quantile(q)) = q, tails included
        back = bars.cdf(logits, tf.constant(qs[:, j])).numpy()
        np.testing.assert_allclose(back, lv, atol=2e-5)
    assert np.all(qs[:, 0] < BORDERS[1]) and np.all(qs[:, -1] > BORDERS[-2])  # into the tails
    np.testing.assert_allclose(bars.median(logits).numpy(), qs[:, 4])


@TAILS
def test_the_nll_of_a_fitted_bar_distribution_approaches_the_density_it_fits(tail):
    """Bins at the quantiles of N(0, 1) samples, logits = log of each bin's true mass: the
    expected NLL tends to N(0, 1)'s entropy as the bins get finer."""
    rng = np.random.default_rng(0)
    prior = rng.normal(size=200000)
    test = tf.constant(rng.normal(size=20000), tf.float32)
    entropy = 0.5 * math.log(2 * math.pi * math.e)
    gaps = []
    for n_bins in (8, 32, 128, 512):
        b = borders_from_samples(prior, n_bins).astype(np.float64)
        cdf = 0.5 * (1 + np.vectorize(math.erf)(b / math.sqrt(2)))
        mass = np.diff(cdf)
        mass[0] += cdf[0]
        mass[-1] += 1 - cdf[-1]
        bars = BarDistribution(b, tail=tail)
        logits = tf.constant(np.log(mass)[None].repeat(len(test), 0), tf.float32)
        nll = -float(tf.reduce_mean(bars.log_prob(logits, test)))
        gaps.append(nll - entropy)
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] >= -0.005, gaps
    assert gaps[3] < 0.01, gaps  # about 1/n_bins: the outer bins' tails


def test_a_far_query_costs_tens_of_nats_under_pareto_tails_and_t2_under_normal_ones():
    """A query t units beyond the upper tail's start: (a + 1) log(1 + t / s) + const nats
    under a Pareto tail of index a (s = (a - 1) E[T], E[T] the half-normal tail's mean),
    t^2 / (2 sigma^2) + const under a half-normal one; the mean is the same under both."""
    logits = _logits(4)
    lp_last = float(tf.nn.log_softmax(logits)[0, -1])
    sigma = float(BORDERS[-1] - BORDERS[-2]) / 0.6744897501960817  # half its mass within
    mean = BarDistribution(BORDERS).mean(logits).numpy()
    for a in (2.5, 3.0, 6.0):
        bars = BarDistribution(BORDERS, tail="pareto", tail_index=a)
        s = (a - 1) * sigma * math.sqrt(2 / math.pi)
        for t in (0.0, 1.0, 1e3, 1e5):
            y = tf.constant([BORDERS[-2] + t] * 4, tf.float32)
            want = -(lp_last + math.log(a / s) - (a + 1) * math.log1p(t / s))
            assert -float(bars.log_prob(logits, y)[0]) == pytest.approx(want, rel=1e-5, abs=1e-4)
        np.testing.assert_array_equal(bars.mean(logits).numpy(), mean)
    far = tf.constant([BORDERS[-2] + 1e3] * 4, tf.float32)
    assert -float(BarDistribution(BORDERS, tail="pareto").log_prob(logits, far)[0]) < 40
    assert -float(BarDistribution(BORDERS).log_prob(logits, far)[0]) > 1e5


def test_the_tail_changes_no_gradient_of_the_nll():
    """The NLL's gradient w.r.t. the logits is the same under either tail, for queries in
    inner bins and far in both tails: a model trains to the same weights with either."""
    logits = tf.Variable(_logits(6, seed=3))
    y = tf.constant([-500.0, -1.5, 0.2, 2.0, 1e4, -0.99], tf.float32)
    grads = []
    for tail in ("normal", "pareto"):
        with tf.GradientTape() as tape:
            nll = -tf.reduce_sum(BarDistribution(BORDERS, tail=tail).log_prob(logits, y))
        grads.append(tape.gradient(nll, logits).numpy())
    np.testing.assert_array_equal(grads[0], grads[1])
    assert np.abs(grads[0]).max() > 0.1


def test_a_tail_other_than_normal_or_pareto_or_an_index_up_to_2_is_refused():
    from gpicl_tf.config import ModelConfig

    with pytest.raises(ValueError, match="tail='cauchy' is invalid: expected one of"):
        BarDistribution(BORDERS, tail="cauchy")
    for bad in (2.0, 1.0, float("inf"), "3"):
        with pytest.raises(ValueError, match="tail_index=.* is invalid: expected a number above 2"):
            BarDistribution(BORDERS, tail="pareto", tail_index=bad)
    with pytest.raises(ValueError, match="model.bar_tail"):
        ModelConfig(head="bar", bar_tail="student")
    with pytest.raises(ValueError, match=r"model.bar_tail_index.*\(2, 1000\]"):
        ModelConfig(head="bar", bar_tail="pareto", bar_tail_index=2)


def test_levels_outside_zero_one_and_bad_borders_are_refused():
    for bad in ([0.0], [1.0], [0.5, 1.2], [-0.1], [float("nan")], []):
        with pytest.raises(ValueError, match="expected numbers strictly between 0 and 1"):
            check_levels(bad)
    np.testing.assert_allclose(check_levels([0.05, 0.95]), [0.05, 0.95])
    with pytest.raises(ValueError, match="expected at least 4 strictly increasing"):
        BarDistribution([0.0, 1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="n_bins=2 is invalid"):
        borders_from_samples(np.arange(10.0), 2)


def test_borders_hold_equal_prior_mass_and_stay_increasing_with_ties():
    rng = np.random.default_rng(1)
    s = rng.standard_t(3, size=50000)
    b = borders_from_samples(s, 10)
    counts = np.histogram(s, b)[0]
    assert counts[1:-1].min() > 0.9 * len(s) / 10 and counts[1:-1].max() < 1.1 * len(s) / 10
    # The outer bins (tails included) hold 1/10 each; half of it lies within their width,
    # as the half-normal tails assume.
    assert np.mean(s < b[1]) == pytest.approx(0.1, abs=0.005)
    assert np.mean(s > b[-2]) == pytest.approx(0.1, abs=0.005)
    assert counts[0] / len(s) == pytest.approx(0.05, abs=0.005)
    assert counts[-1] / len(s) == pytest.approx(0.05, abs=0.005)
    tied = borders_from_samples(np.r_[np.zeros(900), rng.normal(size=100)], 10)
    assert np.all(np.diff(tied) > 0)


def test_quantiles_at_many_levels_at_once_equal_each_level_alone():
    import tensorflow as tf

    from gpicl_tf.distributions import BarDistribution

    bars = BarDistribution(np.linspace(-2.0, 2.0, 17))
    logits = tf.random.stateless_normal([3, 5, 2, 16], seed=[1, 2]) * 2.0
    levels = np.array([1e-4, 0.05, 0.3, 0.5, 0.9, 0.9999], np.float32)
    together = bars.quantiles(logits, levels).numpy()
    assert together.shape == (3, 5, 2, 6)
    for j, level in enumerate(levels):
        np.testing.assert_allclose(together[..., j], bars.quantile(logits, level).numpy(),
                                   rtol=1e-6, atol=1e-6)
    assert (np.diff(together, axis=-1) >= 0).all()


# ------------------------------------------------- warped tails (a recalibration map)
LEVELS = np.array([0.0, 0.002, 0.01, 0.025] + [0.05 * i for i in range(1, 20)]
                  + [0.975, 0.99, 0.998, 1.0])


def _mapped(logits, seed):
    """A random increasing map R on [0, 1] (at LEVELS; 99:1 with the identity, as fitted
    maps are), and for each row of logits the logits of R's bin masses (the tails' ones
    R(p_0) and 1 - R(1 - p_last); the inner bins keep their share of the rest) and the
    tails' warps [n, 4, K] (`BarHead`'s construction): R(F(y)) inside the tails."""
    rng = np.random.default_rng(seed)
    table = 0.99 * np.r_[0.0, np.sort(rng.uniform(size=len(LEVELS) - 2)), 1.0] + 0.01 * LEVELS
    p = tf.nn.softmax(logits).numpy().astype(np.float64)
    lo = np.interp(p[:, 0], LEVELS, table)
    hi = 1.0 - np.interp(1.0 - p[:, -1], LEVELS, table)
    inner = p[:, 1:-1] / p[:, 1:-1].sum(1, keepdims=True) * (1.0 - lo - hi)[:, None]
    new = np.log(np.concatenate([lo[:, None], inner, hi[:, None]], 1))
    flip = 1.0 - table[::-1]
    warp = lambda r, m, mm: [np.minimum(LEVELS / m[:, None], 1.0),  # noqa: E731
                             np.clip(r[None] / mm[:, None], 0.0, 1.0)]
    tails = np.stack(warp(table, p[:, 0], lo) + warp(flip, p[:, -1], hi), 1)
    return table, tf.constant(new, tf.float32), tf.constant(tails, tf.float32)


@TAILS
def test_warped_tails_keep_a_density_whose_cdf_moments_and_quantiles_agree(tail):
    """With tail warps the density still integrates to 1, its integral is the CDF, the
    mean and variance are its moments, the quantiles invert the CDF; inside the tails
    P(Y <= y) = R(F(y)), F the unwarped distribution's CDF."""
    bars = BarDistribution(BORDERS, tail=tail)
    base = _logits(3, seed=7) + tf.constant([[1.5, 0, 0, 0, 0, 1.0]])  # heavy outer bins
    y = _grid(tail)
    yt = tf.constant(y, tf.float32)
    levels = np.array([0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999], np.float32)
    for seed in (1, 2):
        table, logits, tails = _mapped(base, seed)
        mean, var = bars.mean(logits, tails).numpy(), bars.variance(logits, tails).numpy()
        qs = bars.quantiles(logits, levels, tails).numpy()  # (3, L)
        assert np.all(np.diff(qs, axis=-1) > 0)
        for i in range(3):
            li, ti = (tf.repeat(v[i:i + 1], len(y), 0) for v in (logits, tails))
            dens = np.exp(bars.log_prob(li, yt, ti).numpy().astype(np.float64))
            assert np.trapezoid(dens, y) == pytest.approx(1.0, abs=1e-4)
            cdf = bars.cdf(li, yt, ti).numpy()
            numeric = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(y))])
            np.testing.assert_allclose(cdf[::1000], numeric[::1000], atol=2e-4)
            m = np.trapezoid(dens * y, y)
            assert mean[i] == pytest.approx(m, abs=2e-4)
            assert var[i] == pytest.approx(np.trapezoid(dens * (y - m) ** 2, y), rel=1e-3)
            f0 = bars.cdf(tf.repeat(base[i:i + 1], len(y), 0), yt).numpy().astype(np.float64)
            tails_at = (y < BORDERS[1]) | (y > BORDERS[-2])
            np.testing.assert_allclose(cdf[tails_at], np.interp(f0[tails_at], LEVELS, table),
                                       atol=2e-6, rtol=1e-4)
            back = bars.cdf(tf.repeat(logits[i:i + 1], len(levels), 0), tf.constant(qs[i]),
                            tf.repeat(tails[i:i + 1], len(levels), 0)).numpy()
            np.testing.assert_allclose(back, levels, atol=2e-5)
        assert np.abs(mean - bars.mean(logits).numpy()).max() > 1e-3  # the warp moved it


@TAILS
def test_the_identity_warp_changes_nothing(tail):
    bars = BarDistribution(BORDERS, tail=tail)
    logits = _logits(4, seed=3)
    p = tf.nn.softmax(logits).numpy()
    same = lambda m: np.minimum(LEVELS / m[:, None], 1.0)  # noqa: E731
    tails = tf.constant(np.stack([same(p[:, 0]), same(p[:, 0]), same(p[:, -1]),
                                  same(p[:, -1])], 1), tf.float32)
    y = tf.constant([-9.0, -2.5, -1.2, 0.2, 2.0, 3.5, 40.0], tf.float32)
    li, ti = (tf.repeat(v[:, None], 7, 1) for v in (logits, tails))
    yy = tf.repeat(y[None], 4, 0)
    for f in ("log_prob", "cdf"):
        np.testing.assert_allclose(getattr(bars, f)(li, yy, ti).numpy(),
                                   getattr(bars, f)(li, yy).numpy(), rtol=1e-6, atol=1e-7)
    for f in ("mean", "variance"):
        np.testing.assert_allclose(getattr(bars, f)(logits, tails).numpy(),
                                   getattr(bars, f)(logits).numpy(), rtol=1e-5, atol=1e-6)
    levels = np.array([0.001, 0.05, 0.5, 0.95, 0.999], np.float32)
    np.testing.assert_allclose(bars.quantiles(logits, levels, tails).numpy(),
                               bars.quantiles(logits, levels).numpy(), rtol=1e-5, atol=1e-5)
