"""Keras layers of the in-context transformer, registered as serializable.

Shapes: B tasks, N points, dx/dy input/output widths, D model width.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from gpicl_tf.config import ABSENT_FEATURES, BASE_FITS, EVIDENCE_BASE_FITS, GELUS, Y_SCALES

PACKAGE = "gpicl_tf"
LOO_CLIP = 10.0  # leave-one-out fits beyond +-10 standardised units are clipped (fit_loo)
# base fits (base_fit) beyond +-3 standardised units are clipped below 8 context points,
# beyond +-3 n / 8 up to +-6 from there: from a handful of points a picked fit can
# extrapolate far (at k = 4, +-10 doubled the base's error on Garg's trees at width 4
# against +-3; at k = 16 the two differ by under 1%), but from 16 points a linear fit is
# right to: 2-14 of 64 noise-free linear Garg tasks at k = 16 have a query beyond +-3
# of the context's std (up to 4.6), none beyond +-6 at k >= 16
BASE_CLIP = 3.0
BASE_CLIP_MAX = 6.0
# y_scale="loo": the unit is the base fit's leave-one-out RMS error, but not below this
# fraction of the context's std (an exact fit's error is float32 rounding)
LOO_SCALE_FLOOR = 1e-3
CUBIC_POINTS_PER_TERM = 2  # cubic fits need 2 context points per term (see _cubic_design)
KERNEL_FLOAT32_NOISE = 1e-4  # kernel fits with a smaller noise are solved in float64
# y_scale="loo_gp": the relative predictive std is clipped to [GP_UNIT_MIN, GP_UNIT_MAX]
GP_UNIT_MIN, GP_UNIT_MAX = 0.05, 20.0
# kernel_std, y_scale="loo_gp": a predictive variance below it is rounding (float32 fits'
# noise >= 1e-4; the float64 ones' floor is KERNEL_VAR_FLOOR_F64)
KERNEL_VAR_FLOOR = 1e-6
KERNEL_VAR_FLOOR_F64 = 1e-12


def _eye(n, dtype):
    """The n x n identity for a possibly dynamic n."""
    i = ops.arange(n)
    return ops.cast(ops.equal(i[:, None], i[None, :]), dtype)


def _cholesky(a):
    """The lower Cholesky factor of a [..., n, n], failing as keras.ops.cholesky does when
    the factorisation fails (TensorFlow then fills the factor with NaNs), but checking
    its diagonal only: keras checks every entry, 4 ms of the `default` preset's 21 ms of
    context fits per train step (benchmarks/profile_step.py)."""
    chol = tf.linalg.cholesky(a)
    check = tf.debugging.check_numerics(tf.linalg.diag_part(chol),
                                        "Cholesky decomposition failed")
    with tf.control_dependencies([check]):
        return tf.identity(chol)


def _spd_solve(a, rhs):
    """a^-1 rhs for symmetric positive definite a [B, P, n, n], rhs [B, P, n, k]: a
    Cholesky factor and two triangular solves (a handful of ops, since the serving graph
    runs op by op)."""
    chol = _cholesky(a)
    z = ops.solve_triangular(chol, rhs, lower=True)
    return tf.linalg.triangular_solve(chol, z, lower=True, adjoint=True)


Z95 = 1.6448536269514722  # the standard normal's 0.95 quantile
# Cornish-Fisher coefficients of Student's t 0.95 quantile in powers of 1/nu (Abramowitz &
# Stegun 26.7.5), within 0.05% of the exact quantile from nu = 3 on; nu = 1, 2 are exact.
_T95 = (Z95,
        (Z95**3 + Z95) / 4,
        (5 * Z95**5 + 16 * Z95**3 + 3 * Z95) / 96,
        (3 * Z95**7 + 19 * Z95**5 + 17 * Z95**3 - 15 * Z95) / 384,
        (79 * Z95**9 + 776 * Z95**7 + 1482 * Z95**5 - 1920 * Z95**3 - 945 * Z95) / 92160)
T95_NU1 = 6.313751514675043  # tan(0.45 pi), the Cauchy's 0.95 quantile
T95_NU2 = 0.9 / (2 * 0.95 * 0.05) ** 0.5  # (2p - 1) / sqrt(2 p (1 - p)) at p = 0.95


def student_t_factor(n):
    """t_{n-1}(0.95) / z(0.95) x sqrt((n + 1) / (n - 1)) for context counts n (a float
    tensor), 1 where n < 2. With n i.i.d. Gaussian values of standard deviation s (ddof 0),
    a new value lies within z(0.95) x s x factor of their mean with probability exactly
    0.90 (its distance over s x sqrt((n + 1) / (n - 1)) is Student-t with n - 1 degrees of
    freedom)."""
    nu = ops.maximum(n - 1.0, 1.0)
    inv = 1.0 / nu
    cf = _T95[4]
    for c in _T95[3::-1]:
        cf = c + inv * cf
    t = ops.where(nu < 1.5, T95_NU1 * ops.ones_like(nu),
                  ops.where(nu < 2.5, T95_NU2 * ops.ones_like(nu), cf))
    factor = t / Z95 * ops.sqrt((nu + 2.0) / nu)
    return ops.where(n < 2.0, ops.ones_like(factor), factor)


def loo_small_context_term(n):
    """e^(3 - n): what y_scale="loo" adds to the base fit's mean squared leave-one-out error
    (in context variances) for n context points, so that the unit stays near the context's
    std where a handful of points make that error unreliable (ContextStandardizer)."""
    return ops.exp(3.0 - n)


def _merge_last_two(fits):
    """[B, N, P, dy] -> [B, N, P x dy] (P-major)."""
    shape = ops.shape(fits)
    return ops.reshape(fits, (shape[0], shape[1], shape[2] * shape[3]))


@keras.saving.register_keras_serializable(package=PACKAGE)
class ContextStandardizer(keras.layers.Layer):
    """Standardises x and y per task with the mean and std of its context points.

    Only context points (is_query == 0) enter the statistics, so a query never
    influences another query through them. With fewer than two context points
    the scale falls back to 1 (and with none the location to 0). The
    statistics are relative to the data (see `_stats`), so predictions are
    equivariant to a*x + b and c*y + d over float32's range (|values| up to
    gpicl_tf.config.MAX_ABS_VALUE).

    With standardize_y=False (classification) y is passed through unscaled.

    Inputs narrower than dx arrive padded with zero features (absent). A
    feature is present in a task when its context values vary (a constant
    feature carries no information either); absent features standardise to
    exactly 0 at every point. `absent_features` says what else the model is told:
      "zero": nothing (the padding alone);
      "flags": a presence flag per feature is appended to every token;
      "rescale": the standardised present features are multiplied by
        sqrt(dx / d), d the number present, so the token's feature norm does not
        depend on the width (TabPFN's rescaling);
      "both": flags and rescaling.
    Presence comes from the context only, so queries stay independent.

    With `ridge_penalties` (lambda_1, ...), every token also carries, per
    penalty, the prediction at its x of the ridge regression fitted to the
    task's context in standardised units: w = (X'X + lambda I)^-1 X'y over the
    context rows. Least squares is what a transformer of this size learns
    worst in a short training (Garg et al.'s linear suites); given the fits, it
    learns when to trust them. They come from the context only (queries stay
    independent), are sums over the context (permutation invariant), and are
    fitted to per-feature standardised x and y (scale equivariant per feature);
    absent features get weight 0.

    With `kernel_length_scales` (l_1, ...), every token also carries, per length
    scale, the posterior mean at its x of the Gaussian process with the RBF kernel
    exp(-|x - x'|^2 / (2 d l^2)) (d present features) and noise variance
    `kernel_noise` (one number, or one per length scale) conditioned on the context
    in standardised units:
    k(x, X) (K + noise I)^-1 y over the context rows (kernel ridge regression).
    Smooth nonlinear interpolation from a handful of points is what a small
    transformer learns slowly (sine, GP-drawn functions); like the ridge fits,
    these come from the context only, are permutation invariant and per-feature
    scale equivariant, and absent features do not enter the distances.

    With `fit_loo`, a context point's token carries, for every fit, the fit's
    leave-one-out prediction at its x instead (the same fit to the other context
    points; closed form from the hat matrix for ridge, from (K + noise I)^-1 for the
    kernel fits, Rasmussen & Williams eq. 5.12), clipped to +-LOO_CLIP; queries carry
    the full fits as before. A context token's fit then tells how far the fit misses
    a point it did not see, so the model can weigh the fits and size its predictive
    spread from the context; in-sample fits interpolate the context and say nothing
    of either. The fits still come from the context only, and queries stay
    independent.

    With `base_fit="loo_best"`, the location of every point's prediction is no longer
    the context's mean but a fit: per task and output, the fit (of the ridge and kernel
    fits, and the mean itself) whose leave-one-out predictions miss the context's y least
    (leave-one-out cross-validation, as RidgeCV's GCV does), evaluated at the point and
    clipped to +-BASE_CLIP standardised units below 8 context points, +-3 n / 8 up to
    +-BASE_CLIP_MAX from there (the mean below 3 context points). y_loc becomes
    [B, N, dy] = loc + scale * fit, so the head predicts the residual of that fit (the
    bar head's borders are quantiles of the prior's residuals), and every token also
    carries the fit and, on context points, the residual of its y from it. Where the
    selected fit is right (least squares on a noise-free linear task) the head has only
    a residual of nearly 0 to predict. Selection and fits come from the context only,
    are permutation invariant and scale equivariant.

    With `base_fit="loo_evidence"` (needs kernel_length_scales), the same, except that of
    the kernel fits only the one with the highest log marginal likelihood on the context
    competes (its signal variance at the maximum, y'A^-1 y / n: -n/2 log(y'A^-1 y / n)
    - 1/2 log|A|, from the same Cholesky factor): from a handful of points a GP's evidence
    picks a length scale more reliably than the leave-one-out error of each fit does.

    With `base_fit="loo_bma"`, the kernel fit that competes is instead the average of all
    of them weighted by their evidence (softmax over the fits of the log marginal
    likelihoods above: a Bayesian model average over the grid of length scales and
    noises, uniform prior), its leave-one-out fit the same average of theirs; with
    y_scale="loo_gp" its predictive variance is the mixture's, sum_l w_l (s2_l v_l(x) +
    (f_l(x) - f(x))^2) with s2_l each fit's signal variance at its maximum. Where one
    length scale is far likelier it is "loo_evidence"; where a handful of points leave
    several plausible, the average hedges between them, as the posterior does.

    With `y_scale="student_t"`, the returned y_scale (the unit of what the head predicts,
    not of the tokens' features) is the context's standard deviation times
    `student_t_factor(n)` for n context points (6.6 at n = 2, 1.3 at n = 8): the spread of
    a new value around a mean estimated from n points, in units of the std estimated from
    the same points, grows like a Student-t's as n shrinks (the `default` prior's
    standardised query residuals: 5% and 95% quantiles -13.9 and 13.3 std units at n = 2,
    -0.71 and 0.72 at n = 32; -2.1 and 2.0, -0.66 and 0.67 with the factor), and the bar
    head's fixed borders and half-normal tails cannot follow; after the factor, Gaussian
    context values put 90% of new values within +-1.645 units at every n. It depends on n
    only, so queries stay independent and the model equivariant.

    With `y_scale="loo"` (needs base_fit="loo_best"), the unit is the context's standard
    deviation times the selected base fit's leave-one-out root-mean-square error on the
    context in standardised units (sqrt of its mean squared LOO residual plus e^(3 - n),
    a term that keeps the unit near the std where a handful of points make the least
    LOO error unreliable; 1 below 3 context points), at least LOO_SCALE_FLOOR: the head
    predicts the residual in units of how far the fit misses points it did not see, and
    every token also carries the log of that factor, each fit's distance from the base
    in the unit (clipped to +-LOO_CLIP) and, on context points, the base's leave-one-out
    residual in the unit. An exact fit
    (least squares on a noise-free linear task) then leaves the head almost nothing to
    add, and on a noisy task the unit is about the noise's std. Context only, so queries
    stay independent; a ratio of residuals, so the model stays equivariant.

    With `y_scale="loo_gp"` (needs kernel_length_scales too), that unit is per point: it is
    multiplied by the picked base fit's predictive std at the point relative to its
    root-mean-square over the context (`_relative_std`; 1 where the base is a ridge fit or
    the mean). A GP fit is surer of a query near the context than its leave-one-out error
    (one point removed) says, and less sure far from it; the head then predicts every
    residual in its own point's unit, and the tokens' log unit, leave-one-out residual and
    fits in the unit are per point too.

    With `cubic_penalties`, further ridge fits (one per penalty) on every standardised
    feature, its square and its cube (the powers centred on the context) come after the
    ridge fits, given a context of at least 6d + 1 points for d present features (two per
    term; below that the powers are zeroed and they are linear ridge fits): an additive
    cubic is then fitted exactly, and the base fit may pick it.

    With `kernel_std`, every token also carries, per kernel fit, the log of that GP's
    predictive standard deviation of y at its x (unit signal variance): the posterior's
    on a query, the leave-one-out one on a context point, as the fits themselves are.

    Call args: x [B, N, dx], y [B, N, dy], is_query [B, N].
    Returns: features [B, N, dx + dy + 1 (+ dx with flags) (+ dy per penalty)]
      = (x std., y std. zeroed on queries, query flag (, presence flags)
      (, ridge predictions) (, cubic predictions) (, kernel predictions)
      (, base fit, context residual)
      (, with y_scale="loo" or "loo_gp": log unit, context LOO residual, each fit less
      the base)
      (, with kernel_std: each kernel fit's log predictive std)),
      y_loc [B, 1, dy] ([B, N, dy] with base_fit), y_scale [B, 1, dy] ([B, N, dy] with
      y_scale="loo_gp").
    """

    def __init__(self, eps: float = 1e-7, standardize_y: bool = True,
                 absent_features: str = "zero", ridge_penalties=(),
                 kernel_length_scales=(), kernel_noise: float = 0.01,
                 fit_loo: bool = False, base_fit: str = "none", y_scale: str = "std",
                 kernel_std: bool = False, cubic_penalties=(), loo_intercept: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if cubic_penalties and not standardize_y:
            raise ValueError("cubic_penalties are for regression (standardize_y=True): "
                             "expected () for classification")
        if absent_features not in ABSENT_FEATURES:
            raise ValueError(f"absent_features={absent_features!r} is invalid: expected one "
                             f"of {ABSENT_FEATURES}")
        if ridge_penalties and not standardize_y:
            raise ValueError("ridge_penalties are for regression (standardize_y=True): "
                             "expected () for classification")
        if kernel_length_scales and not standardize_y:
            raise ValueError("kernel_length_scales are for regression (standardize_y=True): "
                             "expected () for classification")
        if kernel_std and not kernel_length_scales:
            raise ValueError("kernel_std=True is the kernel fits' predictive std: expected "
                             "kernel_length_scales")
        if fit_loo and not (ridge_penalties or kernel_length_scales):
            raise ValueError("fit_loo=True needs fits: expected ridge_penalties or "
                             "kernel_length_scales")
        if base_fit not in BASE_FITS:
            raise ValueError(f"base_fit={base_fit!r} is invalid: expected one of {BASE_FITS}")
        if base_fit != "none" and not (ridge_penalties or kernel_length_scales):
            raise ValueError(f"base_fit={base_fit!r} needs fits: expected ridge_penalties or "
                             "kernel_length_scales")
        if y_scale not in Y_SCALES:
            raise ValueError(f"y_scale={y_scale!r} is invalid: expected one of {Y_SCALES}")
        if y_scale.startswith("loo") and base_fit == "none":
            raise ValueError(f"y_scale={y_scale!r} is the base fit's leave-one-out error: "
                             f"expected base_fit='loo_best', got {base_fit!r}")
        if base_fit in EVIDENCE_BASE_FITS and not kernel_length_scales:
            raise ValueError(f"base_fit={base_fit!r} weighs the kernel fits by their evidence: "
                             "expected kernel_length_scales")
        if y_scale == "loo_gp" and not kernel_length_scales:
            raise ValueError("y_scale='loo_gp' scales by a kernel base fit's predictive std: "
                             "expected kernel_length_scales")
        if y_scale != "std" and not standardize_y:
            raise ValueError(f"y_scale={y_scale!r} is for regression (standardize_y=True): "
                             "expected 'std' for classification")
        self.base_fit, self.y_scale = base_fit, y_scale
        self.eps = eps
        self.standardize_y = standardize_y
        self.absent_features = absent_features
        self.ridge_penalties = tuple(float(p) for p in ridge_penalties)
        self.cubic_penalties = tuple(float(p) for p in cubic_penalties)
        self.kernel_length_scales = tuple(float(v) for v in kernel_length_scales)
        if isinstance(kernel_noise, (list, tuple)):
            if len(kernel_noise) != len(self.kernel_length_scales):
                raise ValueError(f"kernel_noise={list(kernel_noise)} is invalid: expected one "
                                 f"noise per length scale ({len(self.kernel_length_scales)})")
            self.kernel_noise = tuple(float(v) for v in kernel_noise)
        else:
            self.kernel_noise = float(kernel_noise)
        self.fit_loo = bool(fit_loo)
        self.kernel_std = bool(kernel_std)
        self.loo_intercept = bool(loo_intercept)

    def _stats(self, v, w, n):
        """Location and scale of the context values, relative to the data.

        v (B, N, d), w (B, N, 1) context weights, n (B, 1, 1) context count.
        Returns ref, spread, mean_u, std_u, each (B, 1, d), such that the
        standardised value is ((v - ref) / spread - mean_u) / std_u. The values
        are first shifted by a context point (ref) and divided by their largest
        deviation from it (spread), so squares never overflow float32 and a
        large offset does not cancel away the spread. A spread below `eps`
        times the offset is float32 rounding noise and counts as none: all
        context values equal, scale 0, so the prediction is that value.
        """
        first = ops.argmax(w[..., 0], axis=1)  # (B,) index of the first context point
        pick = ops.expand_dims(ops.one_hot(first, ops.shape(v)[1], dtype=v.dtype), -1)
        ref = ops.sum(v * pick * w, axis=1, keepdims=True)  # (B, 1, d); 0 without context
        dev = (v - ref) * w  # (B, N, d): exact for nearby float32 values
        spread = ops.max(ops.abs(dev), axis=1, keepdims=True)  # (B, 1, d)
        spread = ops.where(spread > self.eps * ops.abs(ref), spread, ops.zeros_like(spread))
        safe = ops.where(spread > 0, spread, ops.ones_like(spread))
        u = dev / safe  # (B, N, d) in [-1, 1]
        mean_u = ops.sum(u, axis=1, keepdims=True) / ops.maximum(n, 1.0)
        var_u = ops.sum(ops.square(u - mean_u) * w, axis=1, keepdims=True) / ops.maximum(n, 1.0)
        std_u = ops.where(spread > 0, ops.sqrt(var_u), ops.ones_like(var_u))
        # Fewer than two context points carry no scale: unit scale around ref.
        few = n < 2.0
        mean_u = ops.where(few, ops.zeros_like(mean_u), mean_u)
        std_u = ops.where(few, ops.ones_like(std_u), std_u)
        safe = ops.where(few, ops.ones_like(safe), safe)
        return ref, safe, mean_u, std_u, spread

    def call(self, x, y, is_query):
        q = ops.expand_dims(ops.cast(is_query, x.dtype), -1)  # (B, N, 1)
        w = 1.0 - q
        n = ops.sum(w, axis=1, keepdims=True)  # (B, 1, 1)
        xs, _, _, x_spread = self._standardize(x, w, n)
        if self.standardize_y:
            ys, y_loc, y_scale, _ = self._standardize(y, w, n)
        else:  # classification: y is one-hot, used as is
            ys, y_loc, y_scale = y, ops.zeros_like(y[:, :1]), ops.ones_like(y[:, :1])
        ys = ys * w  # queries' y never enters the model
        parts = [xs, ys, q]
        present = ops.cast(x_spread > 0, x.dtype)  # (B, 1, dx) from the context only
        fits = []  # (fit, leave-one-out fit or None) pairs, each [B, N, F, dy]
        if self.ridge_penalties:
            fits.append(self._ridge(xs, ys, w, self.ridge_penalties))
        if self.cubic_penalties:
            fits.append(self._ridge(self._cubic_design(xs, w, n, present), ys, w,
                                    self.cubic_penalties))
        kernel_var = evidence = amp = None
        if self.kernel_length_scales:
            kernel_fit, kernel_loo, kernel_var, evidence, amp = self._kernel(xs, ys, w, present)
            fits.append((kernel_fit, kernel_loo))
        extra = []
        if fits:
            fit = ops.concatenate([f for f, _ in fits], axis=2)  # (B, N, F, dy)
            loo = (ops.clip(ops.concatenate([v for _, v in fits], axis=2), -LOO_CLIP, LOO_CLIP)
                   if self._need_loo else None)
            extra.append(_merge_last_two(self._context_loo(fit, loo, w) if self.fit_loo
                                         else fit))
            if self.base_fit != "none":
                eligible, cand_fit, cand_loo, cand_var = None, fit, loo, None
                n_kernel = len(self.kernel_length_scales)
                n_other = ops.shape(fit)[2] - n_kernel  # ridge and cubic fits, first
                if kernel_var is not None:  # (B, N, F, dy): 1 for the ridge fits
                    cand_var = self._candidate_var(kernel_var, fit, n_other)
                if evidence is not None:  # which kernel fits compete, by their evidence
                    ones = ops.ones_like(evidence[:, :1])  # (B, 1, dy)
                    if self.base_fit == "loo_evidence":
                        best = ops.one_hot(ops.argmax(evidence, axis=1), n_kernel, axis=1,
                                           dtype=fit.dtype)  # (B, L, dy)
                        eligible = ops.concatenate([ones] * n_other + [best], axis=1)
                    else:  # loo_bma: their evidence-weighted average, as one more fit
                        mix = self._kernel_average(fit[:, :, n_other:], loo[:, :, n_other:],
                                                   kernel_var, evidence, amp, w)
                        cand_fit = ops.concatenate([fit, mix[0]], axis=2)
                        cand_loo = ops.concatenate([loo, mix[1]], axis=2)
                        if cand_var is not None:
                            cand_var = ops.concatenate([cand_var, mix[2]], axis=2)
                        eligible = ops.concatenate([ones] * n_other + [0.0 * ones] * n_kernel
                                                   + [ones], axis=1)
                base, base_err, loo_resid, pick = self._loo_best(cand_fit, cand_loo, ys, w, n,
                                                                 eligible)
                extra += [base, (ys - base) * w]
                y_loc = y_loc + y_scale * base
                if self.y_scale == "loo_gp":  # per point: times the relative predictive std
                    base_err = base_err * self._relative_std(cand_var, pick, w, n)
                if self.y_scale.startswith("loo"):
                    y_scale = y_scale * base_err
                    # every token is told the unit and sees, in it, how far each fit is
                    # from the base; context tokens also the base's leave-one-out residual
                    in_unit = lambda v, u: ops.clip(v / u, -LOO_CLIP, LOO_CLIP)
                    extra += [ops.log(base_err) * ops.ones_like(ys),
                              in_unit(loo_resid, base_err) * w,
                              _merge_last_two(in_unit(fit - base[:, :, None],
                                                      base_err[:, :, None]))]
        if self.kernel_std:  # each kernel fit's log predictive std
            extra.append(0.5 * ops.log(kernel_var))
        if self.absent_features != "zero":
            if self.absent_features in ("rescale", "both"):
                d = ops.maximum(ops.sum(present, axis=-1, keepdims=True), 1.0)
                parts[0] = xs * ops.sqrt(x.shape[-1] / d)
            if self.absent_features in ("flags", "both"):
                parts.append(present * ops.ones_like(xs))
        if self.y_scale == "student_t":
            y_scale = y_scale * student_t_factor(n)
        return ops.concatenate(parts + extra, axis=-1), y_loc, y_scale

    @staticmethod
    def _loo_best(fit, loo, ys, w, n, eligible=None):
        """[B, N, dy]: per task and output, the fit [B, N, F, dy] whose leave-one-out
        predictions loo miss the context's ys least, clipped to +-BASE_CLIP (up to
        +-BASE_CLIP_MAX from 8 context points on), or 0 (the
        context's mean) where the mean's own leave-one-out error, ys_i n / (n - 1), is
        less (always below 3 context points: too few to cross-validate a fit);
        [B, 1, dy] the picked fit's leave-one-out RMS error, at least LOO_SCALE_FLOOR
        (1 below 3 context points), with a small-context term (see below); and [B, N, dy]
        the picked fit's leave-one-out residuals on the context (0 on queries); and the pick
        [B, F, dy] (one-hot over the fits, all 0 for the mean). With `eligible` [B, F, dy]
        (0 or 1), only the fits marked 1 (and the mean) compete."""
        err = ops.sum(ops.square(loo - ys[:, :, None]) * w[..., None], axis=1)  # (B, F, dy)
        if eligible is not None:
            err = ops.where(eligible > 0, err, ops.full_like(err, 1e30))
        mean_err = (ops.sum(ops.square(ys) * w, axis=1)
                    * ops.square(n[:, 0] / ops.maximum(n[:, 0] - 1.0, 1.0)))  # (B, dy)
        mean_err = ops.where(n[:, 0] < 3.0, -ops.ones_like(mean_err), mean_err)
        err = ops.concatenate([mean_err[:, None], err], axis=1)  # the mean first: ties pick it
        pick = ops.one_hot(ops.argmin(err, axis=1), ops.shape(err)[1], axis=1,
                           dtype=fit.dtype)[:, 1:]  # (B, F, dy); all 0 for the mean
        mse = ops.min(err, axis=1) / ops.maximum(n[:, 0], 1.0)  # (B, dy)
        # From a few points the least of the fits' leave-one-out errors is often near 0 by
        # chance (at 3-5 points the median picked error was 0.03 of the std and the prior's
        # queries then missed by up to 1,500 of it): a term worth e^-1 less with every
        # further point keeps the unit near the std there (5%/95% of the `default` prior's
        # standardised query residuals -5.7/4.7 at 3-5 points, -2.1/2.1 at 12-23)
        mse = mse + loo_small_context_term(n[:, 0])
        rms = ops.sqrt(ops.maximum(mse, LOO_SCALE_FLOOR ** 2))
        rms = ops.where(n[:, 0] < 3.0, ops.ones_like(rms), rms)
        clip = BASE_CLIP * ops.clip(n[:, 0] / 8.0, 1.0, BASE_CLIP_MAX / BASE_CLIP)  # (B, 1)
        base = ops.sum(fit * pick[:, None], axis=2)  # (B, N, dy)
        resid = ops.where(ops.sum(pick, axis=1, keepdims=True) > 0,  # (B, N, dy)
                          ops.sum((ys[:, :, None] - loo) * pick[:, None], axis=2),
                          ys * (n / ops.maximum(n - 1.0, 1.0))) * w
        return (ops.minimum(ops.maximum(base, -clip[:, None]), clip[:, None]), rms[:, None],
                resid, pick)

    @property
    def _need_loo(self):
        return self.fit_loo or self.base_fit != "none"

    @staticmethod
    def _candidate_var(kernel_var, fit, n_other):
        """[B, N, F, dy]: each fit's predictive variance at every point for
        `_relative_std`: a kernel fit's GP variance (`_kernel`), 1 for the n_other ridge
        and cubic fits before them (which leave the unit per task)."""
        var = kernel_var[..., None] * ops.ones_like(fit[:, :, :1])  # (B, N, L, dy)
        if not n_other:
            return var
        return ops.concatenate([ops.ones_like(fit[:, :, :n_other]), var], axis=2)

    @staticmethod
    def _kernel_average(fit, loo, var, evidence, amp, w):
        """base_fit="loo_bma": the kernel fits' evidence-weighted average ([B, N, 1, dy]
        each): the fit, the leave-one-out fit, and the mixture's predictive variance
        sum_l w_l (s2_l var_l + (f_l - f)^2) (at context points from the leave-one-out
        fits and variances, as `_kernel` gives them), s2_l = amp the signal variance."""
        wts = ops.softmax(evidence, axis=1)[:, None]  # (B, 1, L, dy)
        avg = lambda v: ops.sum(v * wts, axis=2, keepdims=True)
        mean_fit, mean_loo = avg(fit), avg(loo)
        if var is None:  # no kernel_std, no loo_gp: no variances
            return mean_fit, mean_loo, None
        at = ops.where(w[:, :, :, None] > 0, loo, fit)  # what var is of, at every point
        mean_at = ops.where(w[:, :, :, None] > 0, mean_loo, mean_fit)
        mix_var = avg(amp[:, None] * var[..., None] + ops.square(at - mean_at))
        return mean_fit, mean_loo, mix_var

    def _relative_std(self, var, pick, w, n):
        """y_scale="loo_gp": [B, N, dy] the picked base fit's predictive std at every point
        relative to its root-mean-square over the context, sqrt(s2(x) / mean_ctx s2),
        clipped to [GP_UNIT_MIN, GP_UNIT_MAX]. var [B, N, F, dy] is each fit's predictive
        variance (`_candidate_var`: a kernel fit's GP variance, the posterior's at queries
        and the leave-one-out one at context points; 1 for the ridge fits) and the mean's
        is 1 (those leave the unit per task)."""
        picked = ops.sum(var * pick[:, None], axis=2)  # (B, N, dy)
        picked = picked + (1.0 - ops.sum(pick, axis=1, keepdims=True))  # the mean: 1
        ctx = ops.sum(picked * w, axis=1, keepdims=True) / ops.maximum(n, 1.0)  # (B, 1, dy)
        ctx = ops.where(n > 0.0, ctx, ops.ones_like(ctx))  # no context: the mean's 1
        rel = ops.sqrt(picked / ops.maximum(ctx, KERNEL_VAR_FLOOR_F64))
        return ops.clip(rel, GP_UNIT_MIN, GP_UNIT_MAX)

    @staticmethod
    def _cubic_design(xs, w, n, present):
        """[B, N, 3 dx]: each standardised feature, its square and its cube, the powers
        centred on the context's mean (absent features stay exactly 0). A context of fewer
        than CUBIC_POINTS_PER_TERM points per term (3 per present feature) plus one gets
        the powers zeroed: its cubic fits are then (to rounding) linear ridge fits at the
        same penalties, so a cubic is never fitted to fewer points than that."""
        d = ops.sum(present, axis=-1, keepdims=True)  # (B, 1, 1) present features
        enough = ops.cast(n >= CUBIC_POINTS_PER_TERM * 3.0 * d + 1.0, xs.dtype)
        powers = [ops.square(xs), xs * ops.square(xs)]
        centred = [(p - ops.sum(p * w, axis=1, keepdims=True) / ops.maximum(n, 1.0)) * enough
                   for p in powers]
        return ops.concatenate([xs] + centred, axis=-1)

    def _ridge(self, xs, ys, w, penalties):
        """The context's ridge fits evaluated at every point, all penalties in one batch
        of solves (a handful of ops however many penalties: the serving graph runs op by
        op): [B, N, P, dy], and (with fit_loo or base_fit, else None) the leave-one-out
        fits (y_hat_i - h_ii y_i) / (1 - h_ii), h_ii = x_i'(X'X + lambda I)^-1 x_i the
        leverage, from the same solve with X' as further right-hand sides. With
        loo_intercept the leverage also counts the intercept the standardisation fitted
        (x and y are centred on the context), h_ii + 1/n, as the mean's own leave-one-out
        error does (y_i n / (n - 1)): without it, from n <= d + 1 context points of d
        features a near-interpolating fit's leverage is about 1 - 1/n and its residuals
        about 0, so its leave-one-out residuals came out near 0 and base_fit picked it."""
        xc = xs * w  # context rows; query rows 0 (ys is already 0 on queries)
        gram = ops.einsum("bni,bnj->bij", xc, xc)  # (B, dx, dx)
        rhs = ops.einsum("bni,bnk->bik", xc, ys)  # (B, dx, dy): X'y
        dy = ops.shape(ys)[-1]
        if self._need_loo:
            rhs = ops.concatenate([rhs, ops.transpose(xc, (0, 2, 1))], axis=-1)  # [X'y, X']
        eye = _eye(ops.shape(xs)[-1], xs.dtype)  # the width may be dynamic (an export pads it)
        lams = ops.convert_to_tensor(penalties, dtype=xs.dtype)
        rhs = ops.repeat(rhs[:, None], len(penalties), axis=1)  # (B, P, dx, .)
        sol = _spd_solve(gram[:, None] + lams[:, None, None] * eye, rhs)
        fit = ops.einsum("bni,bpik->bnpk", xs, sol[..., :dy])  # (B, N, P, dy)
        if not self._need_loo:
            return fit, None
        lev = ops.einsum("bni,bpin->bnp", xc, sol[..., dy:])[..., None]  # (B, N, P, 1)
        if self.loo_intercept:  # the context's mean was fitted too: its leverage 1/n
            n = ops.sum(w, axis=1, keepdims=True)[..., None]  # (B, 1, 1, 1)
            lev = lev + w[..., None] / ops.maximum(n, 1.0)
        return fit, (fit - lev * ys[:, :, None]) / ops.maximum(1.0 - lev, 1e-6)

    @staticmethod
    def _context_loo(fit, loo, w):
        """[B, N, F, dy] fits: the (clipped) leave-one-out fits on context rows (w = 1)."""
        return ops.where(w[:, :, :, None] > 0, loo, fit)

    def _kernel(self, xs, ys, w, present):
        """The context's GP posterior means (RBF kernel, one per length scale) at every
        point, all length scales in one batch of solves: [B, N, L, dy], (with fit_loo
        or base_fit, else None) the leave-one-out fits y_i - alpha_i / (A^-1)_ii,
        (with base_fit="loo_evidence" or "loo_bma", else None) [B, L, dy] each fit's log
        marginal likelihood and signal variance at its maximum, and
        (with kernel_std or y_scale="loo_gp", else None) [B, N, L] each GP's predictive
        variance of y at the point, at least KERNEL_VAR_FLOOR(_F64): on a query the
        posterior's, 1 + noise - k'A^-1 k (unit signal variance: y is standardised), on a
        context point the leave-one-out one, 1 / (A^-1)_ii (Rasmussen & Williams eq.
        5.12), as the fits are. Query rows and columns of the kernel matrix are replaced
        by the identity (and their y is 0), so queries get weight 0 and the solve keeps a
        fixed shape. Fits with a noise below KERNEL_FLOAT32_NOISE are solved in float64 (a
        second batch of solves): a near-exact fit's kernel matrix is too ill-conditioned
        for float32."""
        scales = self.kernel_length_scales
        noises = (self.kernel_noise if isinstance(self.kernel_noise, tuple)
                  else (self.kernel_noise,) * len(scales))
        groups = [[i for i, v in enumerate(noises) if v >= KERNEL_FLOAT32_NOISE],
                  [i for i, v in enumerate(noises) if v < KERNEL_FLOAT32_NOISE]]
        outs = []
        for idx, dtype in zip(groups, (xs.dtype, "float64")):
            if idx:
                args = (ops.cast(v, dtype) for v in (xs, ys, w, present))
                outs.append(self._kernel_group(*args, [scales[i] for i in idx],
                                               [noises[i] for i in idx]))
        if len(outs) == 1:
            return tuple(None if v is None else ops.cast(v, xs.dtype) for v in outs[0])
        order = [(groups[0] + groups[1]).index(i) for i in range(len(scales))]  # config's
        return tuple(None if a is None else ops.take(ops.concatenate(
            [ops.cast(a, xs.dtype), ops.cast(b, xs.dtype)], axis=axis), order, axis=axis)
            for a, b, axis in zip(*outs, (2, 2, 2, 1, 1)))

    def _kernel_group(self, xs, ys, w, present, scales, noises):
        """`_kernel` for the length scales and noises of one dtype."""
        sq = ops.sum(ops.square(xs), axis=-1)  # (B, N); absent features are exactly 0
        d2 = ops.maximum(sq[:, :, None] + sq[:, None, :]
                         - 2.0 * ops.einsum("bni,bmi->bnm", xs, xs), 0.0)  # (B, N, N)
        d = ops.maximum(ops.sum(present, axis=-1), 1.0)  # (B, 1) present features
        ls2 = ops.convert_to_tensor(scales, dtype=xs.dtype) ** 2  # (L,)
        k = ops.exp(-0.5 * d2[:, None] / (d[:, :, None, None] * ls2[None, :, None, None]))
        m = w[..., 0]  # (B, N) context weights
        k_ctx = k * m[:, None, None, :]  # (B, L, N, N): columns of context points only
        noise = ops.reshape(ops.convert_to_tensor(noises, dtype=xs.dtype), (1, -1, 1, 1))
        eye = _eye(ops.shape(xs)[1], xs.dtype)  # (N, N)
        diag = (noise * m[:, None, :, None] + (1.0 - m)[:, None, :, None]) * eye
        rhs = ops.repeat(ys[:, None], len(scales), axis=1)  # (B, L, N, dy)
        a = k_ctx * m[:, None, :, None] + diag  # (B, L, N, N)
        dy = ops.shape(ys)[-1]
        need_var = self.kernel_std or self.y_scale == "loo_gp"
        if not (self._need_loo or need_var):
            alpha = _spd_solve(a, rhs)  # (B, L, N, dy)
            return ops.transpose(ops.matmul(k_ctx, alpha), (0, 2, 1, 3)), None, None, None, None
        # A = C C': C^-1 [y, I] in one triangular solve; then alpha = C'^-1 C^-1 y, and
        # diag(A^-1)_i = sum_j (C^-1)_ji^2, which gives the leave-one-out residuals
        chol = _cholesky(a)
        z = ops.solve_triangular(
            chol, ops.concatenate([rhs, ops.broadcast_to(eye, ops.shape(a))], axis=-1), lower=True)
        c_inv = z[..., dy:]  # C^-1
        z = z[..., :dy]  # C^-1 y
        alpha = tf.linalg.triangular_solve(chol, z, lower=True, adjoint=True)
        fit = ops.transpose(ops.matmul(k_ctx, alpha), (0, 2, 1, 3))  # (B, N, L, dy)
        a_inv_diag = ops.sum(ops.square(c_inv), axis=-2)  # (B, L, N)
        resid = alpha / a_inv_diag[..., None]  # y_i minus the fit to the other points
        loo = ys[:, :, None] - ops.transpose(resid, (0, 2, 1, 3)) if self._need_loo else None
        evidence = amp = None
        if self.base_fit in EVIDENCE_BASE_FITS:
            # log marginal likelihood with the signal variance s2 at its maximum, y'A^-1 y / n:
            # -n/2 log(y'A^-1 y / n) - 1/2 log|A| (+ a constant); the query rows of the
            # Cholesky factor are the identity's and their z 0, so they add nothing
            n = ops.maximum(ops.sum(m, axis=1), 1.0)[:, None, None]  # (B, 1, 1)
            quad = ops.sum(ops.square(z), axis=2)  # (B, L, dy)
            half_logdet = ops.sum(ops.log(ops.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
            amp = ops.maximum(quad / n, 1e-30)  # (B, L, dy) the signal variance s2
            evidence = -0.5 * n * ops.log(amp) - half_logdet[..., None]  # (B, L, dy)
        if not need_var:
            return fit, loo, None, evidence, amp
        v = tf.linalg.matmul(c_inv, k_ctx, transpose_b=True)  # C^-1 k(X, x_j)
        var = 1.0 + noise[..., 0] - ops.sum(ops.square(v), axis=-2)  # (B, L, N) posterior
        var = ops.where(m[:, None] > 0, 1.0 / a_inv_diag, var)  # context: leave-one-out
        f64 = keras.backend.standardize_dtype(xs.dtype) == "float64"
        floor = KERNEL_VAR_FLOOR_F64 if f64 else KERNEL_VAR_FLOOR
        return (fit, loo, ops.transpose(ops.maximum(var, floor), (0, 2, 1)), evidence, amp)

    def _standardize(self, v, w, n):
        ref, safe, mean_u, std_u, spread = self._stats(v, w, n)
        vs = ((v - ref) / safe - mean_u) / std_u
        loc = ref + safe * mean_u
        # A context without spread predicts its constant value (scale 0).
        scale = ops.where((spread > 0) | (n < 2.0), safe * std_u, ops.zeros_like(std_u))
        return vs, loc, scale, spread

    def compute_output_spec(self, x, y, is_query):
        b, n, dx = x.shape
        dy = y.shape[-1]
        flags = dx if self.absent_features in ("flags", "both") else 0
        ridge = dy * (len(self.ridge_penalties) + len(self.cubic_penalties)
                      + len(self.kernel_length_scales))
        base = 2 * dy if self.base_fit != "none" else 0
        if self.y_scale.startswith("loo"):  # the unit, the LOO residual, each fit in it
            base += 2 * dy + ridge
        if self.kernel_std:
            base += len(self.kernel_length_scales)
        feat = keras.KerasTensor((b, n, dx + dy + 1 + flags + ridge + base), dtype=x.dtype)
        loc = keras.KerasTensor((b, n if self.base_fit != "none" else 1, dy), dtype=x.dtype)
        per_point = self.y_scale == "loo_gp"
        return feat, loc, keras.KerasTensor((b, n if per_point else 1, dy), dtype=x.dtype)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps, "standardize_y": self.standardize_y,
                "absent_features": self.absent_features,
                "ridge_penalties": list(self.ridge_penalties),
                "cubic_penalties": list(self.cubic_penalties),
                "kernel_length_scales": list(self.kernel_length_scales),
                "kernel_noise": (list(self.kernel_noise) if isinstance(self.kernel_noise, tuple)
                                 else self.kernel_noise),
                "fit_loo": self.fit_loo, "base_fit": self.base_fit, "y_scale": self.y_scale,
                "kernel_std": self.kernel_std, "loo_intercept": self.loo_intercept}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ContextAttentionMask(keras.layers.Layer):
    """Attention mask [B, N, N]: point i attends to j iff j is context or j == i.

    Queries therefore never see each other (each is predicted independently),
    and a query of a task with no context still attends to itself.
    """

    def call(self, is_query):
        ctx = ops.cast(is_query, "float32") < 0.5  # (B, N)
        n = ops.shape(is_query)[1]
        eye = ops.eye(n, dtype="bool")  # (N, N)
        return ops.logical_or(ctx[:, None, :], eye[None, :, :])  # (B, N, N)

    def compute_output_spec(self, is_query):
        b, n = is_query.shape
        return keras.KerasTensor((b, n, n), dtype="bool")


@keras.saving.register_keras_serializable(package=PACKAGE)
def gelu_tanh(x):
    """GELU's tanh approximation (Hendrycks & Gimpel 2016), the MLP activation of
    model.gelu="tanh"."""
    return keras.activations.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Pre-LayerNorm block: h + MHA(LN(h), mask); then h + MLP(LN(h)).

    MHA's weights are a `keras.layers.MultiHeadAttention` (`self.attn`); `attention`
    computes its mathematics with one fused query/key/value matmul.

    The residual output projections start scaled by `residual_scale`
    (1/sqrt(2 * n_layers), as in GPT-2) so that the stack starts close to the
    identity and deep stacks train from the first step.

    gelu: the MLP's activation, "exact" GELU or its "tanh" approximation (ModelConfig).
    """

    def __init__(self, d_model: int, n_heads: int, key_dim: int, mlp_dim: int,
                 residual_scale: float = 1.0, gelu: str = "exact", **kwargs):
        super().__init__(**kwargs)
        if gelu not in GELUS:
            raise ValueError(f"gelu={gelu!r} is invalid: expected one of {GELUS}")
        self.gelu = gelu
        self.d_model = d_model
        self.n_heads = n_heads
        self.key_dim = key_dim
        self.mlp_dim = mlp_dim
        self.residual_scale = residual_scale
        out_init = keras.initializers.VarianceScaling(scale=residual_scale**2, mode="fan_in",
                                                      distribution="truncated_normal")
        self.ln_attn = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_attn")
        self.attn = keras.layers.MultiHeadAttention(
            num_heads=n_heads, key_dim=key_dim, output_shape=d_model, name="attn")
        self.ln_mlp = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_mlp")
        self.mlp_in = keras.layers.Dense(mlp_dim, name="mlp_in",
                                         activation="gelu" if gelu == "exact" else gelu_tanh)
        self.mlp_out = keras.layers.Dense(d_model, kernel_initializer=out_init, name="mlp_out")

    def build(self, h_shape, mask_shape=None):
        self.ln_attn.build(h_shape)
        self.attn.build(h_shape, h_shape)
        self.ln_mlp.build(h_shape)
        self.mlp_in.build(h_shape)
        self.mlp_out.build(tuple(h_shape[:-1]) + (self.mlp_dim,))
        # Scale the attention output projection like mlp_out (MultiHeadAttention
        # takes one kernel initializer for all four projections).
        kernel = self.attn.output_dense.kernel
        kernel.assign(kernel * self.residual_scale)

    def attention(self, h, mask):
        """The attention sublayer's update: MHA(LN(h)) under mask [B, N, N].

        The mathematics of `self.attn` (a `keras.layers.MultiHeadAttention`, whose weights
        and names it keeps: checkpoints and .keras files are unchanged) computed with one
        matmul for the query, key and value projections instead of three einsums: under XLA
        the mlp1d train step ran 1.03x as many steps/s on 2 CPU cores
        (benchmarks/attention_paths.py; 1.04-1.13x in probes, no change without XLA).
        Scores scaled by 1/sqrt(key_dim) (folded into the query projection), masked
        positions set to a large negative value before a float32 softmax, as
        MultiHeadAttention does (tests/test_model.py holds the two equal).
        """
        a = self.ln_attn(h)  # (B, N, D)
        mha, dtype = self.attn, a.dtype
        heads, key_dim = mha.num_heads, mha.key_dim
        hk = heads * key_dim
        scale = 1.0 / math.sqrt(key_dim)
        factors = ((mha.query_dense, scale), (mha.key_dense, 1.0), (mha.value_dense, 1.0))
        kernel = ops.concatenate([ops.reshape(ops.cast(p.kernel, dtype), (self.d_model, hk)) * f
                                  for p, f in factors], axis=1)  # (D, 3 hk)
        bias = ops.concatenate([ops.reshape(ops.cast(p.bias, dtype), (hk,)) * f
                                for p, f in factors], axis=0)
        b, n = ops.shape(a)[0], ops.shape(a)[1]
        qkv = ops.matmul(ops.reshape(a, (-1, self.d_model)), kernel) + bias  # (B N, 3 hk)
        q, k, v = (ops.reshape(t, (b, n, heads, key_dim)) for t in ops.split(qkv, 3, axis=1))
        scores = ops.cast(ops.einsum("btnh,bsnh->bnts", q, k), "float32")  # (B, H, N, N)
        scores = ops.where(mask[:, None], scores, -1e9)
        weights = ops.cast(ops.softmax(scores, axis=-1), dtype)
        out = ops.reshape(ops.einsum("bnts,bsnh->btnh", weights, v), (-1, hk))  # (B N, hk)
        out = ops.matmul(out, ops.reshape(ops.cast(mha.output_dense.kernel, dtype),
                                          (hk, self.d_model)))
        return ops.reshape(out + ops.cast(mha.output_dense.bias, dtype), (b, n, self.d_model))

    def mlp(self, h):
        """The MLP sublayer's update: MLP(LN(h))."""
        return self.mlp_out(self.mlp_in(self.ln_mlp(h)))

    def call(self, h, mask):
        h = h + self.attention(h, mask)
        return h + self.mlp(h)

    def compute_output_shape(self, h_shape, mask_shape=None):
        return h_shape

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "n_heads": self.n_heads,
                "key_dim": self.key_dim, "mlp_dim": self.mlp_dim,
                "residual_scale": self.residual_scale, "gelu": self.gelu}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Destandardize(keras.layers.Layer):
    """Maps standardised predictions back to the task's raw scale: out * scale + loc."""

    def call(self, out, y_loc, y_scale):
        return ops.cast(out, y_loc.dtype) * y_scale + y_loc

    def compute_output_spec(self, out, y_loc, y_scale):
        return keras.KerasTensor(out.shape, dtype=y_loc.dtype)


def normal_borders(n_bins: int) -> list:
    """n_bins + 1 borders at standard-normal quantiles (levels 0.5/n_bins .. 1 - 0.5/n_bins
    at the ends): the bar head's borders before training draws the prior's."""
    from statistics import NormalDist

    levels = [(i + 0.5) / (n_bins + 1) for i in range(n_bins + 1)]
    return [NormalDist().inv_cdf(p) for p in levels]


def unit_scale(y_scale):
    """The unit a bar head's distribution is in: y_scale, or 1 (raw units of y) where it
    is 0 (a context whose y do not vary carries no scale, as one point carries none)."""
    return ops.where(y_scale > 0, y_scale, ops.ones_like(y_scale))


RECAL_BUCKETS = 13  # context sizes 0, 1, 2, 3, 4-5, 6-7, 8-11, 12-15, ..., 48-63, 64+
# The levels at which the recalibration map is given: every 0.05, finer in the tails,
# where a prior's far misses pile up its probability integral transforms.
RECAL_LEVELS = ((0.0, 0.002, 0.01, 0.025) + tuple(round(0.05 * i, 2) for i in range(1, 20))
                + (0.975, 0.99, 0.998, 1.0))
RECAL_KNOTS = len(RECAL_LEVELS) - 1  # the map's pieces
# recalibrate_width: input-width groups of the maps, 1, 2, 3-4, 5-8 and 9 or more features
RECAL_WIDTHS = 5


def width_group(feats, x_dim: int):
    """The recalibration width group [B, N] (int32) of every point: of its own standardised
    x (the first x_dim features), how many are not exactly 0, grouped 1, 2, 3-4, 5-8, 9+
    (0 features counts as 1). Padded (absent) features standardise to exactly 0 and
    present ones almost never do, at every context size: with one context point or none a
    point's x less the context's is still nonzero where the feature is present, though
    the context's spread (the presence flags) is 0 there. From the point's own token, so
    queries stay independent."""
    d = ops.sum(ops.cast(ops.not_equal(feats[..., :x_dim], 0.0), "float32"), axis=-1)
    g = ops.ceil(ops.log(ops.maximum(d, 1.0)) / math.log(2.0) - 1e-6)  # ceil(log2 d)
    return ops.cast(ops.minimum(g, RECAL_WIDTHS - 1), "int32")


def context_bucket(n):
    """The recalibration bucket [...] (int32) of context sizes n [...]: n itself below 4,
    then two buckets per doubling (4-5, 6-7, 8-11, 12-15, 16-23, ...), at most 12."""
    n = ops.maximum(ops.cast(n, "float32"), 0.0)
    e = ops.floor(ops.log(ops.maximum(n, 1.0)) / math.log(2.0) + 1e-6)  # floor(log2 n)
    half = ops.cast(n >= 1.5 * ops.power(2.0, e), "float32")
    b = ops.where(n < 4.0, n, 4.0 + 2.0 * (e - 2.0) + half)
    return ops.cast(ops.minimum(b, RECAL_BUCKETS - 1), "int32")


def _tail_warp(table, mass, mapped):
    """A tail's warp under the map R given by table [B, RECAL_KNOTS + 1]: mass [B, N, dy]
    the tail's mass F(b) under the model, mapped [B, N, dy] its mass R(F(b)) - R(0)
    (float64). The tail's fraction s of its mass (beyond a point) becomes
    (R(s F(b)) - R(0)) / mapped, piecewise linear through xs = min(levels / F(b), 1),
    ys = (R(levels) - R(0)) / mapped clipped to [0, 1]: [B, N, dy, 2, RECAL_KNOTS + 1]."""
    levels = ops.convert_to_tensor(RECAL_LEVELS, "float64")
    xs = ops.minimum(levels / ops.maximum(mass, 1e-300)[..., None], 1.0)
    rows = (table - table[:, :1])[:, None, None, :]  # (B, 1, 1, M + 1)
    ys = ops.clip(rows / ops.maximum(mapped, 1e-300)[..., None], 0.0, 1.0)
    return ops.stack([xs, ys], axis=-2)


def bar_outputs(bar, h, y_loc, y_scale, is_query, feats=None) -> dict:
    """The model's output dict of a bar head `bar` (BarHead): y_pred, logits, y_loc,
    y_scale and, with a recalibration map, the tail warps ("tails"). feats: the
    standardiser's features (the maps' width groups, with recalibrate_width)."""
    out = bar(h, y_loc, y_scale, is_query, feats) if bar.by_width else bar(h, y_loc, y_scale,
                                                                          is_query)
    outputs = {"y_pred": out[1], "logits": out[0], "y_loc": y_loc, "y_scale": y_scale}
    if len(out) == 3:
        outputs["tails"] = out[2]
    return outputs


def _mapped_mass(table, left, mass):
    """The mass R(left + mass) - R(left) of intervals under the increasing piecewise-linear
    R given by table [B, RECAL_KNOTS + 1] (its values at RECAL_LEVELS): left, mass [B, ...]
    float64. Where the interval lies within one of R's pieces, it is the piece's slope
    times mass, exact however small the mass; elsewhere the difference of R's values."""
    levels = ops.convert_to_tensor(RECAL_LEVELS, "float64")
    shape = ops.shape(left)
    left = ops.reshape(left, (shape[0], -1))
    mass = ops.reshape(mass, (shape[0], -1))
    right = ops.minimum(left + mass, 1.0)

    def value(u):
        i = ops.searchsorted(levels, ops.reshape(u, (-1,)), side="right") - 1
        i = ops.reshape(ops.cast(ops.clip(i, 0, RECAL_KNOTS - 1), "int32"), ops.shape(u))
        lo = ops.take_along_axis(table, i, axis=1)
        hi = ops.take_along_axis(table, i + 1, axis=1)
        start = ops.take(levels, i)
        slope = (hi - lo) / (ops.take(levels, i + 1) - start)
        return lo + (u - start) * slope, slope, i

    r_left, slope, i_left = value(left)
    r_right, _, i_right = value(right)
    out = ops.where(i_left == i_right, slope * mass, r_right - r_left)
    return ops.reshape(out, shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BarHead(keras.layers.Layer):
    """The bar-distribution head: logits over n_bins bins of each standardised output.

    Holds the bins' borders as a non-trainable weight [n_bins + 1], so they travel
    with checkpoints, .keras files and SavedModels; training sets them to quantiles
    of the prior's standardised query y before the first step.

    With `recalibrate`, it also holds a recalibration map per context size bucket
    (`context_bucket`), a non-trainable weight [RECAL_BUCKETS, RECAL_KNOTS + 1]: the
    values at RECAL_LEVELS of an increasing piecewise-linear R on [0, 1]. Outside
    training, each bin's mass becomes R(F(right border)) - R(F(left border)), F the
    distribution's CDF (Kuleshov et al. 2018's recalibration, on the head's own bins):
    the inner bins stay uniform on the same borders, and where R is the empirical CDF of
    the prior's probability integral transforms its central intervals cover what they
    claim on the prior. The map starts as the identity (no change);
    `gpicl_tf.train.fit_recalibration` fits it after training.

    Inside the outer bins the map applies to the CDF itself, not to the bin's mass only:
    P(Y <= y) = R(F(y)) there, so a tail's shape moves with the map and a quantile inside
    it is placed where the prior's transforms put it (the bin-level map alone left the
    tail's shape as it was: at k = 2, where the 5% and 95% quantiles of most queries lie
    in a tail, the 90% intervals covered 0.86). The head then also returns each point's
    tail warps [B, N, dy, 4, RECAL_KNOTS + 1] (see `gpicl_tf.distributions`), the
    identity in training.

    `tail` and `tail_index` choose the outer bins' tails (`BarDistribution`). They change
    no gradient (the NLL's gradient w.r.t. the logits does not depend on where in its bin
    a query falls), so a model trained with one tail holds the weights it would have
    with the other; only its densities, moments and quantiles beyond the outer borders
    differ.

    With `by_width` (model.recalibrate_width) there is a map per context-size bucket and
    input-width group (`width_group`: 1, 2, 3-4, 5-8, 9+ features), each point taking
    that of its own width: the coverage of a prior of many widths differs between its
    wide and its narrow tasks at the same context size, which one map per size cannot fix
    (README, "Leave-one-out with the intercept", on the option). x_dim: the model's
    input width (the features' first x_dim columns are the standardised x).

    Call args: h [B, N, D], y_loc [B, 1, dy], y_scale [B, 1, dy], is_query [B, N]
      (needed by the recalibration only), feats [B, N, F] the standardiser's features
      (needed with by_width only).
    Returns: logits [B, N, dy, n_bins] and the distribution's mean on the raw
      scale of y [B, N, dy]; with `recalibrate`, also the tail warps.
    """

    def __init__(self, y_dim: int, n_bins: int, recalibrate: bool = False,
                 tail: str = "normal", tail_index: float = 3.0, by_width: bool = False,
                 x_dim: int = 0, **kwargs):
        super().__init__(**kwargs)
        from gpicl_tf.distributions import check_tail

        check_tail(tail, tail_index)
        if by_width and not (recalibrate and isinstance(x_dim, int) and x_dim >= 1):
            raise ValueError(f"by_width=True (maps per input width) needs recalibrate=True and "
                             f"x_dim >= 1, got recalibrate={recalibrate!r}, x_dim={x_dim!r}")
        self.by_width, self.x_dim = bool(by_width), int(x_dim)
        self.y_dim, self.n_bins, self.recalibrate = y_dim, n_bins, bool(recalibrate)
        self.tail, self.tail_index = tail, float(tail_index)
        self.dense = keras.layers.Dense(y_dim * n_bins, kernel_initializer="zeros",
                                        name="logits")

    def build(self, h_shape, y_loc_shape=None, y_scale_shape=None, is_query_shape=None,
              feats_shape=None):
        self.dense.build(h_shape)
        self.borders = self.add_weight(
            shape=(self.n_bins + 1,), name="borders", trainable=False,
            initializer=keras.initializers.Constant(normal_borders(self.n_bins)))
        if self.recalibrate:
            rows = self.recal_rows
            self.recalibration = self.add_weight(
                shape=(rows, RECAL_KNOTS + 1), name="recalibration", trainable=False,
                initializer=keras.initializers.Constant([list(RECAL_LEVELS)] * rows))

    @property
    def recal_rows(self) -> int:
        """Rows of the recalibration weight: one map per context-size bucket, and with
        by_width per width group too (row = group * RECAL_BUCKETS + bucket)."""
        return RECAL_BUCKETS * (RECAL_WIDTHS if self.by_width else 1)

    def distribution(self):
        """The BarDistribution over this head's borders (standardised units)."""
        from gpicl_tf.distributions import BarDistribution

        return BarDistribution(self.borders.value if hasattr(self.borders, "value")
                               else self.borders, tail=self.tail, tail_index=self.tail_index)

    def recalibrated(self, logits, is_query, feats=None):
        """logits [B, N, dy, K] -> the logits of the recalibrated bin masses and the
        tails' warps [B, N, dy, 4, RECAL_KNOTS + 1] (float64 inside: the lower tail's
        masses from the CDF, the upper tail's from the survival function, so tiny tail
        masses keep their precision). With by_width each point has its own map, that of
        its width group (`width_group` of feats) and its task's context-size bucket."""
        n = ops.sum(1.0 - ops.cast(is_query, "float32"), axis=1)  # (B,)
        row = context_bucket(n)  # (B,)
        if self.by_width:  # every point its own map: as tasks of one point each
            shape = ops.shape(logits)
            row = ops.reshape(width_group(feats, self.x_dim) * RECAL_BUCKETS + row[:, None],
                              (-1,))  # (B N,)
            logits, tails = self._recalibrated(
                ops.reshape(logits, (-1, 1, shape[2], shape[3])), row)
            return (ops.reshape(logits, shape),
                    ops.reshape(tails, (shape[0], shape[1], shape[2], 4, RECAL_KNOTS + 1)))
        return self._recalibrated(logits, row)

    def _recalibrated(self, logits, row):
        """`recalibrated` with the map of row [B] of the recalibration weight per task."""
        table = ops.cast(ops.take(ops.convert_to_tensor(self.recalibration), row, axis=0),
                         "float64")  # (B, M + 1)
        flip = 1.0 - ops.flip(table, axis=-1)  # G(s) = 1 - R(1 - s): RECAL_LEVELS symmetric
        p = ops.softmax(ops.cast(logits, "float64"), axis=-1)
        below = ops.cumsum(p, axis=-1) - p  # F at each bin's left border
        above = ops.flip(ops.cumsum(ops.flip(p, axis=-1), axis=-1), axis=-1) - p  # 1 - F right
        mass = ops.where(below < 0.5, _mapped_mass(table, below, p),
                         _mapped_mass(flip, above, p))
        tails = ops.concatenate([_tail_warp(table, p[..., 0], mass[..., 0]),
                                 _tail_warp(flip, p[..., -1], mass[..., -1])], axis=-2)
        return (ops.cast(ops.log(ops.maximum(mass, 1e-300)), "float32"),
                ops.cast(tails, "float32"))

    def call(self, h, y_loc, y_scale, is_query=None, feats=None, training=False):
        logits = ops.cast(self.dense(h), "float32")
        shape = ops.shape(h)
        logits = ops.reshape(logits, (shape[0], shape[1], self.y_dim, self.n_bins))
        tails = None
        if self.by_width and feats is None and is_query is not None and not training:
            raise ValueError("a bar head with maps per input width (by_width) needs the "
                             "standardiser's features: call it as bar(h, y_loc, y_scale, "
                             "is_query, feats)")
        if self.recalibrate and is_query is not None and not training:
            logits, tails = self.recalibrated(logits, is_query, feats)
        mean = self.distribution().mean(logits, tails)  # (B, N, dy), standardised
        y_pred = mean * unit_scale(y_scale) + y_loc
        if not self.recalibrate:
            return logits, y_pred
        if tails is None:  # the identity: W(s) = s
            levels = ops.convert_to_tensor(RECAL_LEVELS, "float32")
            tails = ops.broadcast_to(levels, (shape[0], shape[1], self.y_dim, 4, RECAL_KNOTS + 1))
        return logits, y_pred, tails

    def compute_output_spec(self, h, y_loc, y_scale, is_query=None, feats=None,
                            training=False):
        b, n, _ = h.shape
        out = (keras.KerasTensor((b, n, self.y_dim, self.n_bins), dtype="float32"),
               keras.KerasTensor((b, n, self.y_dim), dtype="float32"))
        if self.recalibrate:
            out += (keras.KerasTensor((b, n, self.y_dim, 4, RECAL_KNOTS + 1), dtype="float32"),)
        return out

    def get_config(self):
        return {**super().get_config(), "y_dim": self.y_dim, "n_bins": self.n_bins,
                "recalibrate": self.recalibrate, "tail": self.tail,
                "tail_index": self.tail_index, "by_width": self.by_width, "x_dim": self.x_dim}
