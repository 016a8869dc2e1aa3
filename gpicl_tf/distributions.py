"""The bar ("Riemann") distribution of PFNs (Mueller et al. 2022), with full support.

A predictive distribution over a scalar y given by logits over B bins with borders
b_0 < b_1 < ... < b_B. Inner bins (1..B-2) are uniform on [b_i, b_{i+1}]. The outer bins
carry tails instead, so every y has a density: the first bin's mass lies below b_1 as
b_1 - T, the last bin's above b_{B-1} as b_{B-1} + T, T >= 0 a half-normal sigma |Z|
(tail="normal", as PFNs' FullSupportBarDistribution: sigma chosen so that half the bin's
mass falls within its original width) or a Lomax (Pareto type II) variable of tail index
a, P(T > t) = (1 + t / s)^-a (tail="pareto"), its scale s = (a - 1) E[T] chosen so that
its mean E[T] is the half-normal tail's: the distribution's mean, the point prediction,
is the same under either tail. A query t outside costs
t^2 / (2 sigma^2) nats under the normal tail and (a + 1) log(1 + t / s) under the Pareto
one: where a context's y barely vary (two points of a step function), its unit is tiny
and a query hundreds of units away costs thousands of nats with the first, 10-30 with
the second. Mean, variance, median, any quantile, the CDF and the log density follow
from the logits in closed form; every function here is TensorFlow, so it runs inside a
model and an exported signature.

    bars = BarDistribution(borders_from_samples(y_prior, 64))
    nll = -bars.log_prob(logits, y)        # logits [..., B], y [...]
    lo, hi = bars.quantile(logits, 0.05), bars.quantile(logits, 0.95)

Every function also takes `tails`, per-point warps of the two tails' shapes (a
recalibration map applied inside the outer bins, `BarHead`): [..., 4, K] holding xs_lo,
ys_lo, xs_hi, ys_hi, each increasing from 0 to 1. A tail's T then has
P(T > t) = W(S(t)), S the unwarped tail's survival function and W the piecewise-linear
map through the points (xs, ys): the tail's mass stays the bin's, its shape moves.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from gpicl_tf.config import BAR_TAILS as TAILS

# For a half-normal |Z| sigma: P(|Z| sigma < w) = 1/2 at w = sigma * PHI_INV_075.
PHI_INV_075 = 0.6744897501960817
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def borders_from_samples(samples, n_bins: int) -> np.ndarray:
    """B + 1 increasing borders at the quantiles of `samples` (e.g. standardised y drawn
    from the training prior), so every bin holds about the same prior mass, 1/B.

    The inner borders b_1..b_{B-1} are the quantiles at levels i/B. The outer two are
    the quantiles at levels 1/(2B) and 1 - 1/(2B), not the sample's minimum and
    maximum: each half-normal tail keeps half its mass within the outer bin's width,
    so the tail's median then sits at the samples' median beyond b_1 (b_{B-1}), and
    a few extreme samples do not widen the tails.
    """
    if not (isinstance(n_bins, int) and n_bins >= 3):
        raise ValueError(f"n_bins={n_bins!r} is invalid: expected an integer >= 3")
    s = np.sort(np.asarray(samples, np.float64).ravel())
    s = s[np.isfinite(s)]
    if len(s) < n_bins + 1:
        raise ValueError(f"borders need at least n_bins + 1 = {n_bins + 1} finite samples, got "
                         f"{len(s)}")
    levels = np.linspace(0.0, 1.0, n_bins + 1)
    levels[0], levels[-1] = 0.5 / n_bins, 1.0 - 0.5 / n_bins
    b = np.quantile(s, levels)
    # Ties (e.g. many identical samples) would make empty bins: keep a minimum width.
    min_width = 1e-4 * max(b[-1] - b[0], 1e-6)
    for i in range(1, len(b)):
        b[i] = max(b[i], b[i - 1] + min_width)
    return b.astype(np.float32)


def check_levels(levels) -> np.ndarray:
    """Quantile levels as a float32 array, each strictly inside (0, 1)."""
    a = np.asarray(levels, np.float64).ravel()
    bad = a[~((a > 0) & (a < 1))]
    if a.size == 0 or bad.size:
        raise ValueError(f"quantile levels {bad.tolist()!r} are invalid: "
                         "expected numbers strictly between 0 and 1")
    return a.astype(np.float32)


def check_tail(tail, tail_index) -> None:
    """Refuses a tail that is not one of TAILS, or a Pareto tail index of 2 or less (its
    variance, which the head's std reports, would be infinite)."""
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r} is invalid: expected one of {TAILS}")
    if tail == "pareto" and not (isinstance(tail_index, (int, float))
                                 and math.isfinite(tail_index) and tail_index > 2):
        raise ValueError(f"tail_index={tail_index!r} is invalid: expected a number above 2 "
                         "(a Pareto tail's variance is finite only there)")


class BarDistribution:
    """Closed-form statistics of bar distributions with half-normal or Pareto tails.

    Args:
      borders: [B + 1] increasing bin borders (B >= 3).
      tail: "normal" (half-normal tails) or "pareto" (Lomax tails of index tail_index).
      tail_index: the Pareto tails' index a > 2 (the density falls as t^-(a + 1)).
    """

    def __init__(self, borders, tail: str = "normal", tail_index: float = 3.0):
        check_tail(tail, tail_index)
        self.tail, self.tail_index = tail, float(tail_index)
        if isinstance(borders, (tf.Variable, tf.Tensor)):  # e.g. a model's borders weight
            self.borders = borders
            self.n_bins = int(borders.shape[0]) - 1
            return
        b = np.asarray(borders, np.float32)
        if b.ndim != 1 or len(b) < 4 or not np.all(np.diff(b) > 0):
            raise ValueError(f"borders of shape {b.shape} are invalid: expected at least 4 "
                             "strictly increasing values (3 bins)")
        self.n_bins = len(b) - 1
        self.borders = tf.constant(b)

    # Derived from the borders at each call, so a borders variable may change (restore).
    @property
    def widths(self):
        b = tf.convert_to_tensor(self.borders)
        return b[1:] - b[:-1]

    def _scale(self, width):
        """The tail's scale: the half-normal's whose median lies at `width` beyond the
        tail's start, or the Pareto one's of the same mean."""
        if self.tail == "normal":
            return width / PHI_INV_075
        return width / PHI_INV_075 * SQRT_2_OVER_PI * (self.tail_index - 1.0)

    @property
    def sigma_lo(self):  # scale of the left tail
        return self._scale(self.widths[0])

    @property
    def sigma_hi(self):
        return self._scale(self.widths[-1])

    # The tail's functions of t, the distance beyond its start (>= 0), and its scale.
    def _tail_log_pdf(self, t, scale):
        if self.tail == "normal":
            return math.log(SQRT_2_OVER_PI) - tf.math.log(scale) - 0.5 * tf.square(t / scale)
        a = self.tail_index
        return math.log(a) - tf.math.log(scale) - (a + 1.0) * tf.math.log1p(t / scale)

    def _tail_survival(self, t, scale):
        """P(T > t), t >= 0."""
        if self.tail == "normal":
            return 2.0 * (1.0 - _phi(t / scale))
        return tf.exp(-self.tail_index * tf.math.log1p(t / scale))

    def _tail_inverse_survival(self, s, scale):
        """The t with P(T > t) = s, s in (0, 1]."""
        if self.tail == "normal":
            return scale * _phi_inv(1.0 - s / 2.0)
        return scale * tf.math.expm1(-tf.math.log(s) / self.tail_index)

    def _tail_moments(self, width):
        """E[T] and E[T^2] of the tail of an outer bin of that width (E[T] computed alike
        for both tails, so the mean is the same to the last bit)."""
        sigma = width / PHI_INV_075
        m1 = sigma * SQRT_2_OVER_PI
        if self.tail == "normal":
            return m1, tf.square(sigma)
        a = self.tail_index
        return m1, 2.0 * tf.square(m1) * (a - 1.0) / (a - 2.0)

    def _tail_inverse_survival64(self, s, scale):
        """_tail_inverse_survival in float64 (s, scale float64), for s down to 1e-300. The
        half-normal's is capped at 40 scales, where no mass is left: under XLA, ndtri
        of an argument below about 1e-20 is -inf, and inf * 0 in the moments NaN."""
        if self.tail == "normal":
            return tf.minimum(scale * -tf.math.ndtri(s / 2.0), 40.0 * scale)
        return scale * tf.math.expm1(-tf.math.log(s) / self.tail_index)

    def _tail_partial_moments(self, ta, tb, scale):
        """The integrals of t f(t) and t^2 f(t) over [ta, tb], f the tail's density
        (float64, 0 <= ta <= tb)."""
        if self.tail == "normal":
            za, zb = ta / scale, tb / scale
            pa, pb = _npdf(za), _npdf(zb)
            q = 0.5 * (tf.math.erfc(za / math.sqrt(2.0)) - tf.math.erfc(zb / math.sqrt(2.0)))
            return (2.0 * scale * (pa - pb),
                    2.0 * tf.square(scale) * (q - zb * pb + za * pa))
        a = self.tail_index
        va, vb = 1.0 + ta / scale, 1.0 + tb / scale
        sa, sb = va**-a, vb**-a
        m1 = ta * sa - tb * sb + scale / (a - 1.0) * (va**(1.0 - a) - vb**(1.0 - a))
        t_survival = tf.square(scale) * ((vb**(2.0 - a) - va**(2.0 - a)) / (2.0 - a)
                                         - (vb**(1.0 - a) - va**(1.0 - a)) / (1.0 - a))
        return m1, tf.square(ta) * sa - tf.square(tb) * sb + 2.0 * t_survival

    def _warp_moment_shift(self, xs, ys, width):
        """How a tail's warp (xs, ys [..., K]) moves its E[T] and E[T^2]: float32 [...]
        each. Computed piece by piece in float64 (the warped density is the tail's
        times the piece's slope)."""
        xs, ys = tf.cast(xs, tf.float64), tf.cast(ys, tf.float64)
        width = tf.cast(width, tf.float64)
        scale = self._scale(width)
        t = self._tail_inverse_survival64(tf.clip_by_value(xs, 1e-300, 1.0), scale)
        m1, m2 = self._tail_partial_moments(t[..., 1:], t[..., :-1], scale)
        _, slope = _pieces(xs, ys)
        e1, e2 = self._tail_moments(width)
        return (tf.cast(tf.reduce_sum(slope * m1, -1) - e1, tf.float32),
                tf.cast(tf.reduce_sum(slope * m2, -1) - e2, tf.float32))

    @property
    def b_lo(self):  # where the tails start
        return tf.convert_to_tensor(self.borders)[1]

    @property
    def b_hi(self):
        return tf.convert_to_tensor(self.borders)[-2]

    # ------------------------------------------------------------------ densities
    def _bin(self, y):
        """Index of the bin (with tails: the first / last bin beyond b_1 / b_{B-1})."""
        idx = tf.searchsorted(self.borders[1:-1], tf.reshape(y, [-1]), side="right")
        return tf.reshape(idx, tf.shape(y))

    def log_prob(self, logits, y, tails=None):
        """log p(y): logits [..., B], y [...] -> [...] (tails: see the module)."""
        logp = tf.nn.log_softmax(logits, axis=-1)
        idx = self._bin(y)
        lp_bin = tf.gather(logp, idx, batch_dims=len(y.shape))
        inner = lp_bin - tf.math.log(tf.gather(self.widths, idx))
        t_lo, t_hi = tf.maximum(self.b_lo - y, 0.0), tf.maximum(y - self.b_hi, 0.0)
        lower = lp_bin + self._tail_log_pdf(t_lo, self.sigma_lo)
        upper = lp_bin + self._tail_log_pdf(t_hi, self.sigma_hi)
        if tails is not None:  # the warp's slope at the point (its survival kept > 0)
            s_lo = tf.maximum(self._tail_survival(t_lo, self.sigma_lo), 1e-37)
            s_hi = tf.maximum(self._tail_survival(t_hi, self.sigma_hi), 1e-37)
            lower += tf.math.log(_warp_slope(s_lo, tails[..., 0, :], tails[..., 1, :]))
            upper += tf.math.log(_warp_slope(s_hi, tails[..., 2, :], tails[..., 3, :]))
        return tf.where(idx == 0, lower, tf.where(idx == self.n_bins - 1, upper, inner))

    def cdf(self, logits, y, tails=None):
        """P(Y <= y): logits [..., B], y [...] -> [...] (tails: see the module)."""
        p = tf.nn.softmax(logits, axis=-1)
        idx = self._bin(y)
        below = tf.gather(tf.math.cumsum(p, axis=-1, exclusive=True), idx,
                          batch_dims=len(y.shape))  # mass of the bins left of idx
        p_bin = tf.gather(p, idx, batch_dims=len(y.shape))
        left = tf.gather(self.borders, idx)
        frac_inner = (y - left) / tf.gather(self.widths, idx)
        lo = self._tail_survival(tf.maximum(self.b_lo - y, 0.0), self.sigma_lo)
        hi = self._tail_survival(tf.maximum(y - self.b_hi, 0.0), self.sigma_hi)
        if tails is not None:
            lo = _warp(lo, tails[..., 0, :], tails[..., 1, :])
            hi = _warp(hi, tails[..., 2, :], tails[..., 3, :])
        hi = 1.0 - hi
        frac = tf.where(idx == 0, lo, tf.where(idx == self.n_bins - 1, hi, frac_inner))
        return below + p_bin * frac

    # ----------------------------------------------------------------- statistics
    def _bin_moments(self):
        """Each bin's first and second moments [B] (tails included)."""
        b = self.borders
        left, right = b[:-1], b[1:]
        m1 = 0.5 * (left + right)
        m2 = (tf.square(left) + left * right + tf.square(right)) / 3.0
        (t0, t0_2), (t1, t1_2) = (self._tail_moments(self.widths[0]),
                                  self._tail_moments(self.widths[-1]))
        lo1 = self.b_lo - t0
        lo2 = self.b_lo**2 - 2 * self.b_lo * t0 + t0_2
        hi1 = self.b_hi + t1
        hi2 = self.b_hi**2 + 2 * self.b_hi * t1 + t1_2
        n = self.n_bins
        first = tf.concat([lo1[None], m1[1:n - 1], hi1[None]], 0)
        second = tf.concat([lo2[None], m2[1:n - 1], hi2[None]], 0)
        return first, second

    def _moments(self, logits, tails=None, second=True):
        """E[Y] and E[Y^2] (None unless `second`): logits [..., B] -> [...] each."""
        first, squares = self._bin_moments()
        p = tf.nn.softmax(logits, axis=-1)
        m1 = tf.reduce_sum(p * first, axis=-1)
        m2 = tf.reduce_sum(p * squares, axis=-1) if second else None
        if tails is not None:  # each warped tail's E[T], E[T^2] in place of the tail's
            lo1, lo2 = self._warp_moment_shift(tails[..., 0, :], tails[..., 1, :],
                                               self.widths[0])
            hi1, hi2 = self._warp_moment_shift(tails[..., 2, :], tails[..., 3, :],
                                               self.widths[-1])
            p_lo, p_hi = p[..., 0], p[..., -1]
            m1 += p_hi * hi1 - p_lo * lo1
            if second:  # (b_lo - T)^2 and (b_hi + T)^2
                m2 += (p_lo * (lo2 - 2.0 * self.b_lo * lo1)
                       + p_hi * (hi2 + 2.0 * self.b_hi * hi1))
        return m1, m2

    def mean(self, logits, tails=None):
        return self._moments(logits, tails, second=False)[0]

    def variance(self, logits, tails=None):
        m1, m2 = self._moments(logits, tails)
        return tf.maximum(m2 - tf.square(m1), 0.0)

    def stddev(self, logits, tails=None):
        return tf.sqrt(self.variance(logits, tails))

    def quantile(self, logits, level, tails=None):
        """The level-quantile, level a float in (0, 1) or a tensor broadcasting against
        logits[..., 0]: logits [..., B] -> [...]."""
        p = tf.nn.softmax(logits, axis=-1)
        q = tf.broadcast_to(tf.cast(level, p.dtype), tf.shape(p)[:-1])
        return self._quantiles(p, q[..., None], tails)[..., 0]

    def quantiles(self, logits, levels, tails=None):
        """Quantiles at every level of levels [L], at once: logits [..., B] -> [..., L]."""
        p = tf.nn.softmax(logits, axis=-1)
        levels = tf.cast(levels, p.dtype)
        q = tf.broadcast_to(levels, tf.concat([tf.shape(p)[:-1], tf.shape(levels)], 0))
        return self._quantiles(p, q, tails)

    def _quantiles(self, p, q, tails=None):
        """p [..., B] bin masses, q [..., L] levels -> the quantiles [..., L]."""
        cum = tf.math.cumsum(p, axis=-1)  # mass up to and including each bin
        idx = tf.minimum(tf.reduce_sum(tf.cast(cum[..., None, :] < q[..., None], tf.int32),
                                       -1), self.n_bins - 1)  # (..., L)
        batch = len(q.shape) - 1
        below = tf.gather(cum - p, idx, batch_dims=batch)
        p_bin = tf.maximum(tf.gather(p, idx, batch_dims=batch), 1e-30)
        frac = tf.clip_by_value((q - below) / p_bin, 0.0, 1.0)
        inner = tf.gather(self.borders, idx) + frac * tf.gather(self.widths, idx)
        eps = 2e-7
        s_lo, s_hi = frac, 1.0 - frac
        if tails is not None:  # the unwarped tail's survival at the warped one's
            w = tails[..., None, :, :]  # (..., 1, 4, K) against the levels (..., L)
            s_lo = _warp(s_lo, w[..., 1, :], w[..., 0, :])
            s_hi = _warp(s_hi, w[..., 3, :], w[..., 2, :])
        # left tail: P(Y <= y) = p0 * P(T > b_lo - y) = frac * p0
        lower = self.b_lo - self._tail_inverse_survival(tf.clip_by_value(s_lo, eps, 1.0),
                                                        self.sigma_lo)
        # right tail: P(Y > y) = p_last * P(T > y - b_hi) = (1 - frac) * p_last
        upper = self.b_hi + self._tail_inverse_survival(tf.clip_by_value(s_hi, eps, 1.0),
                                                        self.sigma_hi)
        return tf.where(idx == 0, lower, tf.where(idx == self.n_bins - 1, upper, inner))

    def median(self, logits, tails=None):
        return self.quantile(logits, 0.5, tails)


def _pieces(xs, ys):
    """The widths and slopes [..., K - 1] of the pieces of the increasing piecewise-linear
    map through (xs, ys) [..., K] (slope 0 where a piece has no width)."""
    dx = xs[..., 1:] - xs[..., :-1]
    return dx, tf.math.divide_no_nan(ys[..., 1:] - ys[..., :-1], dx)


def _warp(x, xs, ys):
    """That map at x [...] (xs from 0 to 1; pieces of zero width add nothing)."""
    dx, slope = _pieces(xs, ys)
    run = tf.clip_by_value(x[..., None] - xs[..., :-1], 0.0, dx)
    return ys[..., 0] + tf.reduce_sum(slope * run, -1)


def _warp_slope(x, xs, ys):
    """The slope of that map at x in (0, 1] (the piece with xs_j < x <= xs_j+1)."""
    _, slope = _pieces(xs, ys)
    inside = (x[..., None] > xs[..., :-1]) & (x[..., None] <= xs[..., 1:])
    return tf.reduce_sum(tf.where(inside, slope, 0.0), -1)


def _npdf(z):
    return tf.exp(-0.5 * tf.square(z)) / math.sqrt(2.0 * math.pi)


def _phi(t):
    return 0.5 * (1.0 + tf.math.erf(t / math.sqrt(2.0)))


def _phi_inv(p):
    return math.sqrt(2.0) * tf.math.erfinv(2.0 * p - 1.0)
