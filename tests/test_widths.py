"""Inputs of any width d <= D (issue 4/7): the stream, the signatures, the estimator."""

import numpy as np
import pytest
import tensorflow as tf

from gpicl_tf import data as data_lib
from gpicl_tf.config import apply_overrides, get_preset
from gpicl_tf.estimator import InContextRegressor


def _widths(x):
    """Per example, the number of leading features that are non-zero somewhere."""
    present = np.any(x != 0, axis=1)  # (B, D)
    return present.sum(1), present


def test_each_example_draws_its_width_and_absent_features_are_zero_everywhere():
    cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=8", "task.min_x_dim=2"]).task
    b = data_lib.sample_batch(cfg, seed=0, n=400)
    d, present = _widths(b["x"].numpy())
    # present features come first: feature j present iff j < d
    assert (present == (np.arange(8)[None] < d[:, None])).all()
    assert d.min() == 2 and d.max() == 8
    counts = np.bincount(d, minlength=9)[2:]
    assert counts.min() > 400 / 7 - 3 * np.sqrt(400 / 7), counts  # ~uniform over 2..8
    again = data_lib.sample_batch(cfg, seed=0, n=400)
    np.testing.assert_array_equal(b["x"].numpy(), again["x"].numpy())  # (seed, step)-pure


def test_width_weights_draw_each_width_with_its_probability():
    w = (4.0, 2.0, 1.0, 1.0)
    cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=5", "task.min_x_dim=2",
                                              "task.x_dim_weights=4,2,1,1"]).task
    n = 4000
    d, _ = _widths(data_lib.sample_batch(cfg, seed=0, n=n)["x"].numpy())
    p = np.array(w) / sum(w)
    counts = np.bincount(d, minlength=6)[2:]
    assert (np.abs(counts - n * p) < 3 * np.sqrt(n * p * (1 - p))).all(), counts
    with pytest.raises(ValueError, match=r"task.x_dim_weights=\(1.0, 1.0\) is invalid: "
                       r"expected \(\) or 4 weights"):
        apply_overrides(get_preset("tiny"), ["task.x_dim=5", "task.min_x_dim=2",
                                            "task.x_dim_weights=1,1"])


def test_absent_features_do_not_enter_the_function():
    """A linear task's y is the same whether the absent features are zero or not drawn at all."""
    cfg = apply_overrides(get_preset("tiny"), ["task.family=linear", "task.x_dim=4",
                                              "task.min_x_dim=1", "task.standardize_y=false"]).task
    from gpicl_tf import tasks

    fam = tasks.get_family("linear")(cfg)
    seed = tf.constant([1, 2], tf.int64)
    x = fam.sample_x(seed, 8, 20)
    w, bias = fam.sample_function(tf.constant([3, 4], tf.int64), 8)
    d, _ = _widths(x.numpy())
    y = fam.evaluate((w, bias), x).numpy()
    for i in range(8):
        k = d[i]
        ref = x.numpy()[i, :, :k] @ w.numpy()[i, :k] + bias.numpy()[i]
        np.testing.assert_allclose(y[i], ref, rtol=1e-5, atol=1e-5)


def test_min_x_dim_outside_one_to_x_dim_is_refused():
    with pytest.raises(ValueError, match=r"task.min_x_dim=9.*\[1, x_dim=8\]"):
        apply_overrides(get_preset("tiny"), ["task.x_dim=8", "task.min_x_dim=9"])


def _task(d, nc=10, nq=4, seed=0):
    rng = np.random.default_rng(seed)
    cx = rng.uniform(-1, 1, (2, nc, d)).astype(np.float32)
    qx = rng.uniform(-1, 1, (2, nq, d)).astype(np.float32)
    cy = np.sin(cx.sum(-1, keepdims=True) * 2).astype(np.float32)
    return cx, cy, qx


def _pad(a, width=8):
    return np.concatenate([a, np.zeros(a.shape[:-1] + (width - a.shape[-1],), a.dtype)], -1)


@pytest.mark.parametrize("export", ["tiny_export_d8", "tiny_export_d8_fits"])
def test_a_width_3_request_equals_the_same_request_padded_to_8_by_hand(export, request):
    path = request.getfixturevalue(export)
    sig = tf.saved_model.load(f"{path}/1").signatures["serving_default"]
    cx, cy, qx = _task(3)
    run = lambda cx, qx: sig(context_x=tf.constant(cx), context_y=tf.constant(cy),
                             query_x=tf.constant(qx))["mean"].numpy()
    narrow, padded = run(cx, qx), run(_pad(cx), _pad(qx))
    assert np.abs(narrow).max() > 1e-3
    np.testing.assert_array_equal(narrow, padded)
    # and it is the model's reading of those features: another width-3 task differs
    assert np.abs(run(*_task(3, seed=1)[::2]) - narrow).max() > 1e-4


def test_masked_signature_pads_too(tiny_export_d8):
    sig = tf.saved_model.load(f"{tiny_export_d8}/1").signatures["masked"]
    cx, cy, qx = _task(3)
    x = np.concatenate([cx, qx], 1)
    y = np.concatenate([cy, np.zeros((2, 4, 1), np.float32)], 1)
    q = np.concatenate([np.zeros((2, 10)), np.ones((2, 4))], 1).astype(np.float32)
    run = lambda x: sig(x=tf.constant(x), y=tf.constant(y), is_query=tf.constant(q))["y_pred"]
    np.testing.assert_array_equal(run(x).numpy(), run(_pad(x)).numpy())


def test_a_width_9_request_names_8(tiny_export_d8):
    sig = tf.saved_model.load(f"{tiny_export_d8}/1").signatures["serving_default"]
    cx, cy, qx = _task(9)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"context_x: expected last "
                       r"dimension \(input width\) in \[1, 8\] \(the model reads at most 8"):
        sig(context_x=tf.constant(cx), context_y=tf.constant(cy), query_x=tf.constant(qx))
    with pytest.raises(ValueError, match=r"X has 9 features, but the model .* expects from 1 "
                       r"to 8 \(it reads at most 8\)"):
        InContextRegressor(tiny_export_d8).fit(cx[0], cy[0, :, 0])


def test_query_and_context_widths_must_agree(tiny_export_d8):
    sig = tf.saved_model.load(f"{tiny_export_d8}/1").signatures["serving_default"]
    cx, cy, _ = _task(3)
    qx = _task(4)[2]
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_x: expected the input "
                       "width of context_x"):
        sig(context_x=tf.constant(cx), context_y=tf.constant(cy), query_x=tf.constant(qx))


@pytest.mark.parametrize("d", [1, 3, 8])
def test_the_estimator_takes_any_width_up_to_8(tiny_export_d8, d):
    cx, cy, qx = _task(d)
    est = InContextRegressor(tiny_export_d8).fit(cx[0], cy[0, :, 0])
    pred = est.predict(qx[0])
    assert pred.shape == (4,) and np.isfinite(pred).all()
    assert est.n_features_in_ == d


def test_query_independence_permutation_invariance_and_per_feature_equivariance_at_d_3(
        tiny_export_d8):
    sig = tf.saved_model.load(f"{tiny_export_d8}/1").signatures["serving_default"]
    run = lambda cx, cy, qx: sig(context_x=tf.constant(cx, tf.float32),
                                 context_y=tf.constant(cy, tf.float32),
                                 query_x=tf.constant(qx, tf.float32))["mean"].numpy()
    cx, cy, qx = _task(3, nc=12, nq=6)
    base = run(cx, cy, qx)
    # a query's prediction does not change when the other queries change
    other = qx.copy()
    other[:, 1:] = _task(3, nc=12, nq=6, seed=7)[2][:, 1:]
    np.testing.assert_allclose(run(cx, cy, other)[:, 0], base[:, 0], atol=1e-5)
    # nor when the context points are permuted
    perm = np.random.default_rng(0).permutation(12)
    np.testing.assert_allclose(run(cx[:, perm], cy[:, perm], qx), base, atol=1e-5)
    # each feature its own affine map, y its own: predictions follow y's map
    a, b = np.array([1e-3, 50.0, 2e3]), np.array([0.5, -3.0, 1e3])
    c, d = 1e2, -7.0
    got = run(a * cx + b, c * cy + d, a * qx + b)
    np.testing.assert_allclose((got - d) / c, base, atol=2e-3 * cy.std())


@pytest.mark.parametrize("absent", ["zero", "flags", "rescale", "both"])
def test_the_standardizer_tells_the_model_what_absent_features_says(absent):
    from gpicl_tf.layers import ContextStandardizer

    cx, cy, qx = _task(3, nc=12, nq=4)
    x = _pad(np.concatenate([cx, qx], 1))
    x[1, :, 2] = 0.25  # task 1: feature 2 constant, so only 2 features carry information
    y = np.concatenate([cy, np.zeros((2, 4, 1), np.float32)], 1)
    q = np.concatenate([np.zeros((2, 12)), np.ones((2, 4))], 1).astype(np.float32)
    feats = ContextStandardizer(absent_features=absent)(x, y, q)[0].numpy()
    plain = ContextStandardizer()(x, y, q)[0].numpy()
    assert feats.shape[-1] == (18 if absent in ("flags", "both") else 10)
    np.testing.assert_array_equal(plain[..., 3:8], 0.0)  # absent features are exactly 0
    np.testing.assert_array_equal(plain[1, :12, 2], 0.0)  # and so is a constant one
    d = np.array([3.0, 2.0])[:, None, None]
    scale = np.sqrt(8 / d) if absent in ("rescale", "both") else 1.0
    np.testing.assert_allclose(feats[..., :8], plain[..., :8] * scale, rtol=1e-6)
    np.testing.assert_array_equal(feats[..., 8:10], plain[..., 8:10])
    if absent in ("flags", "both"):
        want = np.array([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], np.float32)
        np.testing.assert_array_equal(feats[..., 10:], np.broadcast_to(want[:, None], (2, 16, 8)))


@pytest.mark.parametrize("absent, ridge, kernel, loo", [
    ("zero", "", "", ""), ("flags", "", "", ""), ("rescale", "", "", ""), ("both", "", "", ""),
    ("flags", "[0.001,1]", "", ""), ("rescale", "[0.1]", "", ""), ("flags", "[0.1]", "[0.2,1]", ""),
    ("flags", "[0.001,1]", "[0.2,1]", "fit_loo=true"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_best"),
    ("flags", "[0.001,1]", "[0.2,1]", "y_scale=student_t"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_best y_scale=loo"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_best y_scale=loo kernel_std=true"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_best y_scale=loo_gp kernel_std=true"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_evidence y_scale=loo_gp"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_bma y_scale=loo_gp kernel_std=true"),
    ("flags", "[0.001,1]", "[0.2,1]", "base_fit=loo_best y_scale=loo cubic_penalties=[0.001,1]")])
def test_query_independence_permutation_and_per_feature_equivariance_hold_for(absent, ridge,
                                                                              kernel, loo):
    import keras

    from gpicl_tf.model import build_model, masked_inputs

    cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=8", "task.min_x_dim=1",
                                              f"model.absent_features={absent}"]
                          + ([f"model.ridge_penalties={ridge}"] if ridge else [])
                          + ([f"model.kernel_length_scales={kernel}"] if kernel else [])
                          + [f"model.{o}" for o in loo.split()])
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    for w in model.get_layer("head").weights:
        w.assign(tf.random.normal(w.shape, seed=5))
    run = lambda cx, cy, qx: model(masked_inputs(_pad(cx), cy, _pad(qx)),
                                   training=False).numpy()[:, cx.shape[1]:]
    cx, cy, qx = _task(3, nc=12, nq=6)
    base = run(cx, cy, qx)
    assert np.abs(base).max() > 1e-3
    other = qx.copy()
    other[:, 1:] = _task(3, nc=12, nq=6, seed=7)[2][:, 1:]
    np.testing.assert_allclose(run(cx, cy, other)[:, 0], base[:, 0], atol=1e-5)
    perm = np.random.default_rng(0).permutation(12)
    # float32 sums in another order: 1e-5 relative to predictions of up to ~10
    np.testing.assert_allclose(run(cx[:, perm], cy[:, perm], qx), base, atol=1e-5, rtol=1e-5)
    a, b = np.array([1e-3, 50.0, 2e3], np.float32), np.array([0.5, -3.0, 1e3], np.float32)
    got = run(a * cx + b, 1e2 * cy - 7.0, a * qx + b)
    np.testing.assert_allclose((got + 7.0) / 1e2, base, atol=2e-3 * cy.std())


def _assert_fits_see_the_context_only(layer, x, y, q, x3d, start):
    """The fit features (columns start:) of `layer` on a width-3 task x3d padded to x: the
    queries' hidden targets do not enter them, and an absent (zero-padded) or constant
    third feature gives the width-2 fits (weight 0, not counted in the kernel's d)."""
    feats = layer(x, y, q)[0].numpy()[..., start:]
    y2 = y.copy()
    y2[q > 0] = -7.0
    np.testing.assert_array_equal(layer(x, y2, q)[0].numpy()[..., start:], feats)
    x3 = x.copy()
    x3[:, :, 2] = 0.25
    narrow = _pad(x3d[..., :2])
    np.testing.assert_allclose(layer(x3, y, q)[0].numpy()[..., start:],
                               layer(narrow, y, q)[0].numpy()[..., start:], atol=1e-6)


def _assert_refused(layer_kwargs, layer_match, override, config_match):
    """The standardiser refuses layer_kwargs, and the tiny preset the override, each with
    a ValueError matching its pattern."""
    from gpicl_tf.layers import ContextStandardizer

    with pytest.raises(ValueError, match=layer_match):
        ContextStandardizer(**layer_kwargs)
    with pytest.raises(ValueError, match=config_match):
        apply_overrides(get_preset("tiny"), [override])


def test_ridge_features_are_scikit_learns_ridge_on_the_standardised_context():
    from sklearn.linear_model import Ridge

    from gpicl_tf.layers import ContextStandardizer

    cx, cy, qx = _task(3, nc=12, nq=4)
    cy = cy + 0.3 * cx[..., :1] - 2.0 * cx[..., 1:2]  # a linear part for the fit to find
    x = _pad(np.concatenate([cx, qx], 1))
    y = np.concatenate([cy, np.full((2, 4, 1), 50.0, np.float32)], 1)  # queries' y unseen
    q = np.concatenate([np.zeros((2, 12)), np.ones((2, 4))], 1).astype(np.float32)
    lams = (1e-3, 0.5, 20.0)
    layer = ContextStandardizer(absent_features="flags", ridge_penalties=lams)
    feats = layer(x, y, q)[0].numpy()
    assert feats.shape[-1] == 8 + 1 + 1 + 8 + 3
    xs, ys = feats[..., :8], feats[..., 8]
    for b in range(2):
        for j, lam in enumerate(lams):
            fit = Ridge(alpha=lam, fit_intercept=False).fit(xs[b, :12, :3], ys[b, :12])
            np.testing.assert_allclose(feats[b, :, 18 + j], fit.predict(xs[b, :, :3]),
                                       atol=2e-5)
    _assert_fits_see_the_context_only(layer, x, y, q, np.concatenate([cx, qx], 1), 18)


@pytest.mark.parametrize("noise", [0.05, (0.05, 1e-3), (1e-8, 1e-3)])
def test_kernel_features_are_scikit_learns_kernel_ridge_on_the_standardised_context(noise):
    """Also with one noise per length scale (model.kernel_noises), and with a near-exact
    fit (noise below 1e-4, solved in float64) before a float32 one, in the config's order."""
    from sklearn.kernel_ridge import KernelRidge

    from gpicl_tf.layers import ContextStandardizer

    cx, cy, qx = _task(3, nc=12, nq=4)
    cy = cy + np.sin(3.0 * cx[..., :1])  # a smooth part for the fit to find
    x = _pad(np.concatenate([cx, qx], 1))
    y = np.concatenate([cy, np.full((2, 4, 1), 50.0, np.float32)], 1)  # queries' y unseen
    q = np.concatenate([np.zeros((2, 12)), np.ones((2, 4))], 1).astype(np.float32)
    scales = (0.2, 1.0)
    noises = noise if isinstance(noise, tuple) else (noise, noise)
    layer = ContextStandardizer(absent_features="flags", ridge_penalties=(0.1,),
                                kernel_length_scales=scales, kernel_noise=noise)
    feats = layer(x, y, q)[0].numpy()
    assert feats.shape[-1] == 8 + 1 + 1 + 8 + 1 + 2  # kernel fits after the ridge fit
    xs, ys = feats[..., :8], feats[..., 8]
    for b in range(2):
        for j, ls in enumerate(scales):
            # the RBF kernel exp(-gamma |x - x'|^2), length scale ls * sqrt(3 present features)
            fit = KernelRidge(alpha=noises[j], kernel="rbf", gamma=1.0 / (2 * 3 * ls ** 2))
            fit.fit(xs[b, :12, :3], ys[b, :12])
            np.testing.assert_allclose(feats[b, :, 19 + j], fit.predict(xs[b, :, :3]),
                                       atol=2e-5)
    _assert_fits_see_the_context_only(layer, x, y, q, np.concatenate([cx, qx], 1), 19)
    # no context: every fit is 0
    empty = layer(x, y, np.ones_like(q))[0].numpy()[..., 19:]
    np.testing.assert_array_equal(empty, np.zeros_like(empty))


def test_with_fit_loo_context_tokens_carry_each_fits_prediction_from_the_other_points():
    """fit_loo: a context point's ridge and kernel features are scikit-learn's fits to the
    other context points at its x; the queries' features are the full fits, unchanged."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.linear_model import Ridge

    from gpicl_tf.layers import ContextStandardizer

    cx, cy, qx = _task(3, nc=12, nq=4)
    cy = cy + np.sin(3.0 * cx[..., :1]) + 0.5 * cx[..., 1:2]
    x = _pad(np.concatenate([cx, qx], 1))
    y = np.concatenate([cy, np.full((2, 4, 1), 50.0, np.float32)], 1)  # queries' y unseen
    q = np.concatenate([np.zeros((2, 12)), np.ones((2, 4))], 1).astype(np.float32)
    kw = dict(absent_features="flags", ridge_penalties=(1e-3, 0.5),
              kernel_length_scales=(0.2, 1.0), kernel_noise=0.05)
    layer = ContextStandardizer(fit_loo=True, **kw)
    feats = layer(x, y, q)[0].numpy()
    full = ContextStandardizer(**kw)(x, y, q)[0].numpy()
    np.testing.assert_array_equal(feats[:, 12:], full[:, 12:])
    assert np.abs(feats[:, :12, 18:] - full[:, :12, 18:]).min(axis=1).min() > 1e-4
    xs, ys = feats[..., :8], feats[..., 8]
    for b in range(2):
        for i in range(12):
            rest = [j for j in range(12) if j != i]
            fits = [Ridge(alpha=lam, fit_intercept=False) for lam in (1e-3, 0.5)] + [
                KernelRidge(alpha=0.05, kernel="rbf", gamma=1.0 / (2 * 3 * ls ** 2))
                for ls in (0.2, 1.0)]
            want = [f.fit(xs[b, rest, :3], ys[b, rest]).predict(xs[b, i:i + 1, :3])[0]
                    for f in fits]
            np.testing.assert_allclose(feats[b, i, 18:22], want, atol=2e-5)
    _assert_fits_see_the_context_only(layer, x, y, q, np.concatenate([cx, qx], 1), 18)
    _assert_refused(dict(fit_loo=True), "fit_loo=True needs fits", "model.fit_loo=true",
                    r"model.fit_loo=True.*expected a bool, true only "
                    r"with ridge_penalties or kernel_length_scales")


def test_with_loo_intercept_the_ridge_fits_leave_one_out_refits_the_intercept_too():
    """loo_intercept: a context point's ridge feature is scikit-learn's ridge with an
    (unpenalised) intercept fitted to the other context points, as the standardisation
    centred x and y on all of them; the kernel fits' and the queries' features are as
    without it. From n <= d + 1 points (here 4 points of 3 features) the least-penalty
    fit interpolates: without the intercept's leverage its leave-one-out residuals were
    about 0 (the fit looked exact), with it they are those of a refit."""
    from sklearn.linear_model import Ridge

    from gpicl_tf.layers import ContextStandardizer

    cx, cy, qx = _task(3, nc=12, nq=4)
    cy = cy + np.sin(3.0 * cx[..., :1]) + 0.5 * cx[..., 1:2]
    x = _pad(np.concatenate([cx, qx], 1))
    y = np.concatenate([cy, np.full((2, 4, 1), 50.0, np.float32)], 1)
    q = np.concatenate([np.zeros((2, 12)), np.ones((2, 4))], 1).astype(np.float32)
    kw = dict(absent_features="flags", ridge_penalties=(0.05, 0.5),
              kernel_length_scales=(0.2, 1.0), kernel_noise=0.05, fit_loo=True)
    feats = ContextStandardizer(loo_intercept=True, **kw)(x, y, q)[0].numpy()
    plain = ContextStandardizer(**kw)(x, y, q)[0].numpy()
    np.testing.assert_array_equal(feats[:, 12:], plain[:, 12:])  # queries: the full fits
    np.testing.assert_array_equal(feats[..., 20:22], plain[..., 20:22])  # the kernel fits
    xs, ys = feats[..., :8], feats[..., 8]
    for b in range(2):
        for i in range(12):
            rest = [j for j in range(12) if j != i]
            want = [Ridge(alpha=lam).fit(xs[b, rest, :3], ys[b, rest]).predict(
                xs[b, i:i + 1, :3])[0] for lam in (0.05, 0.5)]
            np.testing.assert_allclose(feats[b, i, 18:20], want, atol=5e-5)
    # 4 context points of 3 features, the least penalty: an interpolating fit
    x4, y4, q4 = x[:, 8:], y[:, 8:], q[:, 8:]
    kw4 = dict(absent_features="flags", ridge_penalties=(1e-3,), fit_loo=True)
    resid = {flag: np.abs(ContextStandardizer(loo_intercept=flag, **kw4)(x4, y4, q4)[0].numpy()
                          [:, :4, 18] - ContextStandardizer(**kw4)(x4, y4, q4)[0].numpy()
                          [:, :4, 8]) for flag in (False, True)}
    assert resid[False].max() < 0.05 and resid[True].min() > 0.1, resid


def test_cubic_fits_are_scikit_learns_ridge_on_each_feature_its_square_and_cube():
    """cubic_penalties: per penalty, scikit-learn's Ridge (no intercept: x and y are
    centred on the context) on every standardised feature, its square and its cube (the
    powers centred on the context); an additive cubic is then fitted exactly and picked by
    the base fit, where the linear ridge fits miss it; context only, absent features out.
    Below 2 context points per term (+1) the fits are the linear ridge fits."""
    from sklearn.linear_model import Ridge

    from gpicl_tf.layers import ContextStandardizer

    nc = 24  # 3 present features: 9 terms, so 19 points or more fit the cubic
    cx, cy, qx = _task(3, nc=nc, nq=4)
    cubic = lambda v: (v[..., :1] ** 3 - 0.5 * v[..., 1:2] ** 2 + 0.3 * v[..., 2:3]
                       + 2.0).astype(np.float32)
    x = _pad(np.concatenate([cx, qx], 1))
    y = np.concatenate([cubic(cx), np.full((2, 4, 1), 50.0, np.float32)], 1)  # queries unseen
    q = np.concatenate([np.zeros((2, nc)), np.ones((2, 4))], 1).astype(np.float32)
    lams = (1e-3, 1.0)
    layer = ContextStandardizer(absent_features="flags", cubic_penalties=lams)
    feats = layer(x, y, q)[0].numpy()
    assert feats.shape[-1] == 8 + 1 + 1 + 8 + 2
    xs, ys = feats[..., :3], feats[..., 8]
    for b in range(2):
        powers = [xs[b] ** 2, xs[b] ** 3]
        design = np.concatenate([xs[b]] + [p - p[:nc].mean(0) for p in powers], -1)
        for j, lam in enumerate(lams):
            fit = Ridge(alpha=lam, fit_intercept=False).fit(design[:nc], ys[b, :nc])
            np.testing.assert_allclose(feats[b, :, 18 + j], fit.predict(design), atol=2e-4)
    _assert_fits_see_the_context_only(layer, x, y, q, np.concatenate([cx, qx], 1), 18)
    both = dict(ridge_penalties=(1e-3,), base_fit="loo_best")
    want = cubic(qx)
    for kw, tol in ((dict(cubic_penalties=(1e-6,)), 1e-3), ({}, None)):
        loc = ContextStandardizer(**both, **kw)(x, y, q)[1].numpy()[:, nc:]
        if tol:
            np.testing.assert_allclose(loc, want, atol=tol)
        else:  # least squares alone misses the cubic
            assert np.abs(loc - want).max() > 0.05
    # 12 context points of 3 features: too few for 9 terms; the linear ridge fits instead
    few = q.copy()
    few[:, 12:nc] = 1.0
    got = layer(x, y, few)[0].numpy()[..., 18:20]
    linear = ContextStandardizer(absent_features="flags", ridge_penalties=lams)(x, y, few)
    np.testing.assert_allclose(got, linear[0].numpy()[..., 18:20], atol=1e-4)
    with pytest.raises(ValueError, match=r"model.cubic_penalties=\(1.0,\).*classification"):
        apply_overrides(get_preset("classify"), ["model.cubic_penalties=[1.0]"])
    with pytest.raises(ValueError, match=r"model.cubic_penalties=\(0.0,\).*\(0, 1e6\)"):
        apply_overrides(get_preset("tiny"), ["model.cubic_penalties=[0]"])


def test_a_near_exact_kernel_fit_is_solved_in_float64():
    """A kernel fit with noise 1e-8 at a long length scale (a near-exact interpolation of a
    smooth noise-free function, model.kernel_noises below 1e-4): its fit, leave-one-out fit
    and predictive std are those of a float64 solve within float32 rounding, and it
    predicts a sine from 16 points 20x better than the same fit with noise 1e-4."""
    from gpicl_tf.layers import ContextStandardizer

    rng = np.random.default_rng(5)
    nc, nq = 16, 48
    x = rng.uniform(-1, 1, (2, nc + nq, 1)).astype(np.float32)
    y = np.sin(3.0 * x).astype(np.float32)
    q = (np.arange(nc + nq) >= nc).astype(np.float32)[None].repeat(2, 0)
    layer = ContextStandardizer(kernel_length_scales=(0.8, 0.8), kernel_noise=(1e-8, 1e-4),
                                fit_loo=True, kernel_std=True)
    feats = layer(x, y * (1 - q[..., None]), q)[0].numpy()
    xs, ys = feats[..., 0].astype(np.float64), feats[..., 1].astype(np.float64)
    for b in range(2):
        kern = lambda u, v: np.exp(-0.5 * (u[:, None] - v[None, :]) ** 2 / 0.8 ** 2)
        a_inv = np.linalg.inv(kern(xs[b, :nc], xs[b, :nc]) + 1e-8 * np.eye(nc))
        alpha = a_inv @ ys[b, :nc]
        k_q = kern(xs[b], xs[b, :nc])
        want = k_q @ alpha
        v = np.linalg.solve(np.linalg.cholesky(kern(xs[b, :nc], xs[b, :nc]) + 1e-8 * np.eye(nc)),
                            k_q.T)  # C^-1 k: the variance without inverting A
        var = 1 + 1e-8 - np.sum(v ** 2, axis=0)
        loo = ys[b, :nc] - alpha / np.diag(a_inv)
        # features: x, y (standardised), query flag, the 2 fits (context: leave-one-out),
        # their 2 log predictive stds
        np.testing.assert_allclose(feats[b, nc:, 3], want[nc:], atol=1e-4)
        np.testing.assert_allclose(feats[b, :nc, 3], loo, atol=1e-4)
        np.testing.assert_allclose(feats[b, nc:, 5], 0.5 * np.log(np.maximum(var[nc:], 1e-12)),
                                   atol=0.05)
    ctx = y[:, :nc, 0]
    z = (y[:, nc:, 0] - ctx.mean(1, keepdims=True)) / ctx.std(1, keepdims=True)
    err = [np.mean((feats[:, nc:, 3 + j] - z) ** 2) for j in range(2)]
    assert err[0] < err[1] / 20, err


def test_kernel_std_features_are_scikit_learns_gp_predictive_std_loo_on_the_context():
    """kernel_std: the last L features are the log predictive std of y of scikit-learn's
    GaussianProcessRegressor with each fixed kernel (RBF, the fit's length scale and noise;
    unit signal variance) on the standardised context: at a query the posterior's, at a
    context point the GP's fitted to the other context points. The queries' y do not
    enter them, nor an absent or constant feature; a query far from the context gets
    the prior's std, sqrt(1 + noise)."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF

    from gpicl_tf.layers import ContextStandardizer

    cx, cy, qx = _task(3, nc=12, nq=4)
    qx[:, -1] = 40.0  # far outside the context (standardised: ~70 stds away)
    x = _pad(np.concatenate([cx, qx], 1))
    y = np.concatenate([cy, np.full((2, 4, 1), 50.0, np.float32)], 1)  # queries' y unseen
    q = np.concatenate([np.zeros((2, 12)), np.ones((2, 4))], 1).astype(np.float32)
    scales, noises = (0.2, 1.0), (0.05, 1e-3)
    layer = ContextStandardizer(absent_features="flags", kernel_length_scales=scales,
                                kernel_noise=noises, kernel_std=True)
    feats = layer(x, y, q)[0].numpy()
    assert feats.shape[-1] == 8 + 1 + 1 + 8 + 2 + 2  # the kernel fits, then their stds
    xs, ys = feats[..., :8], feats[..., 8]
    for b in range(2):
        for j, (ls, noise) in enumerate(zip(scales, noises)):
            gp = lambda: GaussianProcessRegressor(RBF(ls * np.sqrt(3.0)), alpha=noise,
                                                  optimizer=None)
            _, std = gp().fit(xs[b, :12, :3], ys[b, :12]).predict(xs[b, 12:, :3],
                                                                  return_std=True)
            want = 0.5 * np.log(std ** 2 + noise)  # the GP's std of y: latent plus noise
            np.testing.assert_allclose(feats[b, 12:, 20 + j], want, atol=1e-4)
            assert feats[b, 15, 20 + j] == pytest.approx(0.5 * np.log(1.0 + noise), abs=1e-6)
            for i in range(12):
                rest = [r for r in range(12) if r != i]
                _, s = gp().fit(xs[b, rest, :3], ys[b, rest]).predict(xs[b, i:i + 1, :3],
                                                                      return_std=True)
                assert feats[b, i, 20 + j] == pytest.approx(0.5 * np.log(s[0] ** 2 + noise),
                                                            abs=1e-4)
    _assert_fits_see_the_context_only(layer, x, y, q, np.concatenate([cx, qx], 1), 18)
    _assert_refused(dict(kernel_std=True), "kernel_std=True .* expected kernel_length_scales",
                    "model.kernel_std=true",
                    r"model.kernel_std=True.*expected a bool, true only with kernel_length_scales")


def test_base_fit_centres_each_task_on_the_fit_with_the_least_leave_one_out_error():
    """base_fit="loo_best": y_loc at every point is the context mean plus the scale times
    the fit (refitted by scikit-learn) whose leave-one-out squared error on the context is
    least; a linear task picks least squares, a wiggly one a short kernel; the queries'
    hidden y do not move it; the tokens carry the fit and the context's residuals."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.linear_model import Ridge

    from gpicl_tf.layers import ContextStandardizer

    rng = np.random.default_rng(0)
    cx, qx = rng.uniform(-1, 1, (2, 16, 3)), rng.uniform(-1, 1, (2, 4, 3))
    cy = np.stack([cx[0, :, :1] - 2.0 * cx[0, :, 1:2] + 0.5 * cx[0, :, 2:],  # linear
                   np.sin(4.0 * cx[1, :, :1].sum(-1, keepdims=True))])  # wiggly
    x = _pad(np.concatenate([cx, qx], 1).astype(np.float32))
    y = np.concatenate([cy, np.full((2, 4, 1), 50.0)], 1).astype(np.float32)
    q = np.concatenate([np.zeros((2, 16)), np.ones((2, 4))], 1).astype(np.float32)
    kw = dict(absent_features="flags", ridge_penalties=(1e-3, 1.0),
              kernel_length_scales=(0.15, 1.0), kernel_noise=0.01)
    feats, loc, scale = (t.numpy() for t in ContextStandardizer(base_fit="loo_best", **kw)(
        x, y, q))
    plain, loc0, _ = (t.numpy() for t in ContextStandardizer(**kw)(x, y, q))
    assert loc.shape == (2, 20, 1) and loc0.shape == (2, 1, 1)
    np.testing.assert_array_equal(feats[..., :plain.shape[-1]], plain)
    xs, ys = plain[..., :8], plain[..., 8]
    picked = []
    for b in range(2):
        makers = [lambda lam=lam: Ridge(alpha=lam, fit_intercept=False) for lam in (1e-3, 1.0)]
        makers += [lambda ls=ls: KernelRidge(alpha=0.01, kernel="rbf",
                                             gamma=1.0 / (2 * 3 * ls ** 2)) for ls in (0.15, 1.0)]
        loo = [np.mean((ys[b, :16] * 16 / 15) ** 2)]  # the mean's: y_i - mean of the others
        loo += [np.mean([(make().fit(xs[b, [j for j in range(16) if j != i], :3],
                                     ys[b, [j for j in range(16) if j != i]])
                          .predict(xs[b, i:i + 1, :3])[0] - ys[b, i]) ** 2
                         for i in range(16)]) for make in makers]
        best = int(np.argmin(loo))
        picked.append(best)
        fit = (makers[best - 1]().fit(xs[b, :16, :3], ys[b, :16]).predict(xs[b, :, :3])
               if best else np.zeros(20))
        np.testing.assert_allclose(loc[b, :, 0], loc0[b, 0, 0] + scale[b, 0, 0] * fit,
                                   atol=2e-4 * scale[b, 0, 0])
        np.testing.assert_allclose(feats[b, :, -2], fit, atol=2e-4)  # the fit ...
        np.testing.assert_allclose(feats[b, :16, -1], ys[b, :16] - fit[:16], atol=2e-4)
        np.testing.assert_array_equal(feats[b, 16:, -1], 0.0)  # ... and the context residual
    assert picked == [1, 3]  # least squares for the linear task, l = 0.15 for the wiggly one
    # below 3 context points, the mean
    two = ContextStandardizer(base_fit="loo_best", **kw)(x, y, np.where(
        np.arange(20) < 2, 0.0, 1.0)[None].repeat(2, 0).astype(np.float32))
    plain_two = ContextStandardizer(**kw)(x, y, np.where(
        np.arange(20) < 2, 0.0, 1.0)[None].repeat(2, 0).astype(np.float32))
    np.testing.assert_array_equal(two[1].numpy(), plain_two[1].numpy() + np.zeros((2, 20, 1)))
    y2 = y.copy()
    y2[q > 0] = -7.0
    np.testing.assert_array_equal(
        ContextStandardizer(base_fit="loo_best", **kw)(x, y2, q)[1].numpy(), loc)
    with pytest.raises(ValueError, match="base_fit='loo_best' needs fits"):
        ContextStandardizer(base_fit="loo_best")
    with pytest.raises(ValueError, match="base_fit='best' is invalid"):
        ContextStandardizer(base_fit="best", **kw)
    with pytest.raises(ValueError, match=r"model.base_fit='loo_best'.*other than 'none' only "
                                         r"with ridge_penalties or kernel_length_scales"):
        apply_overrides(get_preset("tiny"), ["model.base_fit=loo_best"])
    assert apply_overrides(get_preset("default"), ["model.base_fit=none", "model.y_scale=std"]
                           ).model.base_fit == "none"
    with pytest.raises(ValueError, match=r"model.y_scale='loo_gp'.*'loo' only with "  # needs it
                                         r"base_fit='loo_best', 'loo_evidence' or 'loo_bma'"):
        apply_overrides(get_preset("default"), ["model.base_fit=none"])


@pytest.mark.parametrize("field, value, expected", [
    ("kernel_length_scales", "[0]", r"a tuple of at most 16 numbers in \(0, 100\]"),
    ("kernel_length_scales", "[0.5,-1]", r"a tuple of at most 16 numbers in \(0, 100\]"),
    ("kernel_noise", "0", r"a number in \[1e-10, 100\]"),
    ("kernel_noises", "[0.01]", r"\(\) or 0 numbers in \[1e-10, 100\], one per kernel length"),
])
def test_bad_kernel_fields_are_refused_naming_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"model.{field}=.*expected {expected}"):
        apply_overrides(get_preset("tiny"), [f"model.{field}={value}"])
    with pytest.raises(ValueError, match=r"model.kernel_length_scales=\(1.0,\).*classification"):
        apply_overrides(get_preset("classify"), ["model.kernel_length_scales=[1.0]"])


@pytest.mark.parametrize("value", ["[0]", "[-1,2]", "[1e7]"])
def test_bad_ridge_penalties_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"model.ridge_penalties=.*expected a tuple of at "
                                         r"most 16 numbers in \(0, 1e6\)"):
        apply_overrides(get_preset("tiny"), [f"model.ridge_penalties={value}"])


def test_a_model_with_ridge_and_kernel_fits_round_trips_through_a_keras_file(tmp_path):
    import keras

    from gpicl_tf.model import build_model, masked_inputs

    cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=4", "model.ridge_penalties=[0.1,5]",
                                               "model.kernel_length_scales=[0.3,0.3]",
                                               "model.kernel_noises=[0.02,0.001]",
                                               "model.fit_loo=true", "model.base_fit=loo_best",
                                               "model.y_scale=student_t"])
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    for w in model.get_layer("head").weights:
        w.assign(tf.random.normal(w.shape, seed=3))
    cx, cy, qx = _task(4, nc=10, nq=3)
    inputs = masked_inputs(cx, cy, qx)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.ridge_penalties == (0.1, 5.0)
    assert (loaded.kernel_length_scales, loaded.kernel_noise) == ((0.3, 0.3), (0.02, 0.001))
    assert loaded.fit_loo and loaded.get_layer("standardize").fit_loo
    assert loaded.base_fit == loaded.get_layer("standardize").base_fit == "loo_best"
    assert loaded.y_scale == loaded.get_layer("standardize").y_scale == "student_t"
    np.testing.assert_allclose(loaded(inputs).numpy(), model(inputs).numpy(), atol=1e-6)


def test_ridge_penalties_are_refused_for_classification():
    with pytest.raises(ValueError, match=r"model.ridge_penalties=\(1.0,\).*classification"):
        apply_overrides(get_preset("classify"), ["model.ridge_penalties=[1.0]"])


def test_the_student_t_factor_is_students_quantile_ratio():
    from scipy.stats import norm, t

    from gpicl_tf.layers import student_t_factor

    n = np.arange(0, 200, dtype=np.float32)
    got = student_t_factor(tf.constant(n)).numpy()
    want = t.ppf(0.95, np.maximum(n - 1, 1)) / norm.ppf(0.95) * np.sqrt((n + 1) /
                                                                        np.maximum(n - 1, 1))
    np.testing.assert_array_equal(got[:2], 1.0)  # no scale below 2 context points
    np.testing.assert_allclose(got[2:], want[2:], rtol=5e-4)  # Cornish-Fisher from nu = 3


@pytest.mark.parametrize("base_fit", ["none", "loo_best"])
def test_with_student_t_scale_90_percent_of_gaussian_queries_lie_within_z95_at_every_k(
        base_fit):
    """y_scale=student_t: for i.i.d. Gaussian y (nothing to fit: the base is the mean below
    3 points and mostly thereafter), the standardised query residual |y - y_loc| / y_scale
    is below z(0.95) for 90% of the queries at every context size; with the plain std far
    fewer at k = 2 (the spread of a Student-t with 1 degree of freedom)."""
    from gpicl_tf.layers import ContextStandardizer

    rng = np.random.default_rng(1)
    b, n = 4000, 40
    x = rng.uniform(-1, 1, (b, n, 2)).astype(np.float32)
    y = (rng.normal(size=(b, n, 1)) * 3.0 + 2.0).astype(np.float32)
    kw = (dict(ridge_penalties=(1.0,), kernel_length_scales=(1.0,), base_fit="loo_best")
          if base_fit == "loo_best" else {})
    # 3 sigma of a proportion over 4000 tasks of correlated queries: ~0.015. With the base
    # fit, the fit picked by leave-one-out error from 3-5 points fits a little of the
    # noise, so its residuals at the queries are wider: 85-87% within (measured)
    loose = 0.84 if base_fit == "loo_best" else 0.885
    for k, lo in ((2, 0.885), (3, loose), (5, loose), (10, loose), (30, loose)):
        q = np.broadcast_to(np.arange(n) >= k, (b, n)).astype(np.float32)
        inside = {}
        for rule in ("std", "student_t"):
            _, loc, scale = ContextStandardizer(y_scale=rule, **kw)(x, y * (1 - q[..., None]), q)
            z = ((y - loc.numpy()) / scale.numpy())[..., 0][q > 0]
            inside[rule] = np.mean(np.abs(z) <= 1.6448536)
        assert lo <= inside["student_t"] <= 0.915, (k, inside)
        if k == 2:
            assert inside["std"] < 0.7, inside
    with pytest.raises(ValueError, match="y_scale='t' is invalid"):
        ContextStandardizer(y_scale="t")
    with pytest.raises(ValueError, match=r"model.y_scale='t' is invalid.*expected one of "
                                         r"\('std', 'student_t', 'loo', 'loo_gp'\)"):
        apply_overrides(get_preset("tiny"), ["model.y_scale=t"])
    with pytest.raises(ValueError, match=r"model.y_scale='student_t'.*classification"):
        apply_overrides(get_preset("classify"), ["model.y_scale=student_t"])


def test_the_bar_borders_follow_the_y_scale():
    """prior_borders standardises the prior's queries as the model does: with the Student-t
    factor the small contexts' wide residuals shrink, and the borders' range with them."""
    from gpicl_tf.train import prior_borders

    cfg = apply_overrides(get_preset("tiny"), ["model.head=bar", "model.n_bins=16"])
    std = prior_borders(cfg, n_tasks=256)
    student = prior_borders(apply_overrides(cfg, ["model.y_scale=student_t"]), n_tasks=256)
    assert student[-1] - student[0] < 0.8 * (std[-1] - std[0]), (std, student)


@pytest.mark.parametrize("d", [1, 3])
def test_with_the_loo_scale_the_unit_is_the_base_fits_leave_one_out_error(d):
    """y_scale=loo: on a noise-free linear task the picked fit (least squares) misses
    points it did not see by almost nothing, so the unit shrinks to a small fraction of
    the std and the head has nothing to add; with noise of std s the unit is about s;
    below 3 context points it is the std; without base_fit it is refused."""
    from gpicl_tf.layers import ContextStandardizer

    rng = np.random.default_rng(2)
    b, n, k = 64, 48, 32
    x = rng.uniform(-1, 1, (b, n, d)).astype(np.float32)
    w = rng.normal(size=(b, d, 1)).astype(np.float32)
    clean = np.einsum("bnd,bdk->bnk", x, w) * 50.0 + 7.0
    kw = dict(ridge_penalties=(1e-3, 1.0), kernel_length_scales=(0.3,), base_fit="loo_best")
    q = np.broadcast_to(np.arange(n) >= k, (b, n)).astype(np.float32)
    layer = ContextStandardizer(y_scale="loo", **kw)
    plain = ContextStandardizer(**kw)
    for noise in (0.0, 5.0):
        y = (clean + noise * rng.normal(size=clean.shape)).astype(np.float32)
        feats, _, unit = layer(x, y * (1 - q[..., None]), q)
        _, _, std = plain(x, y * (1 - q[..., None]), q)
        ratio = (unit / std).numpy()[:, 0, 0]
        if noise == 0.0:
            assert np.all(ratio < 0.01), ratio.max()
        else:  # the noise's std over the context's std; ridge's LOO error is a bit above it
            want = noise / std.numpy()[:, 0, 0]
            assert 0.9 < np.median(ratio / want) < 1.3, np.median(ratio / want)
        # every token carries the log of the factor, then (context) the base's leave-one-out
        # residual in the unit, then each of the 3 fits' distance from the base in the unit
        f = feats.numpy()
        np.testing.assert_allclose(f[..., -5], np.log(ratio)[:, None] + 0 * q,
                                   rtol=1e-5, atol=1e-5)
        rms = np.sqrt(np.sum(f[..., -4] ** 2, axis=1) / k)
        if noise:  # the unit is that RMS (and e^(3 - k), negligible at k = 32)
            np.testing.assert_allclose(rms, 1.0, rtol=1e-3)
        else:  # ... unless below the floor, 1e-3 of the std
            assert np.all(rms < 0.1), rms.max()
        assert np.all(f[..., -4][q > 0] == 0)
        assert np.abs(f[..., -3:]).max() <= 10.0  # clipped to +-LOO_CLIP
    q2 = np.broadcast_to(np.arange(n) >= 2, (b, n)).astype(np.float32)
    _, _, unit = layer(x, clean * (1 - q2[..., None]), q2)
    _, _, std = plain(x, clean * (1 - q2[..., None]), q2)
    np.testing.assert_allclose(unit.numpy(), std.numpy())
    with pytest.raises(ValueError, match="y_scale='loo'.*expected base_fit='loo_best'"):
        ContextStandardizer(y_scale="loo", ridge_penalties=(1.0,))
    with pytest.raises(ValueError, match=r"model.y_scale='loo' is invalid.*'loo' only with "
                                         r"base_fit='loo_best', 'loo_evidence' or 'loo_bma'"):
        apply_overrides(get_preset("tiny"), ["model.ridge_penalties=[1]", "model.y_scale=loo"])


def test_with_the_loo_gp_scale_the_unit_follows_the_kernel_base_fits_predictive_std():
    """y_scale=loo_gp: where a kernel fit is the base, each point's unit is the "loo" unit
    times sqrt(s2(x) / mean s2 over the context), s2 the GP's predictive variance
    (scikit-learn's GaussianProcessRegressor with the fit's kernel and noise: posterior at
    queries, leave-one-out at context points): small at a query next to a context point,
    large far away (the prior's std there). Where least squares is the base (a noise-free
    linear task) or the mean (no context) the unit stays the task's "loo" unit. The tokens'
    log unit is per point."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF

    from gpicl_tf.layers import ContextStandardizer

    rng = np.random.default_rng(3)
    nc = 16
    cx = np.sort(rng.uniform(-1, 1, (2, nc, 1)), axis=1).astype(np.float32)
    qx = np.stack([cx[:, 3] + 1e-3, (cx[:, 7] + cx[:, 8]) / 2, np.full((2, 1), 1.3),
                   np.full((2, 1), 60.0)], 1).astype(np.float32)  # near, between, out, far
    x = np.concatenate([cx, qx], 1)
    q = np.concatenate([np.zeros((2, nc)), np.ones((2, 4))], 1).astype(np.float32)
    kw = dict(ridge_penalties=(1e-3,), kernel_length_scales=(0.4,), kernel_noise=1e-3,
              base_fit="loo_best")
    gp_layer, loo_layer = (ContextStandardizer(y_scale=u, **kw) for u in ("loo_gp", "loo"))
    y = np.concatenate([np.sin(3 * cx), np.full((2, 4, 1), 50.0, np.float32)], 1)
    feats, loc, unit = (v.numpy() for v in gp_layer(x, y, q))
    loc_loo, unit_loo = (v.numpy() for v in loo_layer(x, y, q)[1:])
    assert unit.shape == (2, nc + 4, 1) and unit_loo.shape == (2, 1, 1)
    np.testing.assert_array_equal(loc, loc_loo)  # the same base
    xs, ys = feats[..., 0], feats[..., 1]  # standardised x and y
    for b in range(2):
        gp = lambda: GaussianProcessRegressor(RBF(0.4), alpha=1e-3, optimizer=None)
        _, sq = gp().fit(xs[b, :nc, None], ys[b, :nc]).predict(xs[b, nc:, None],
                                                                return_std=True)
        s2 = np.empty(nc + 4)
        s2[nc:] = sq ** 2 + 1e-3
        for i in range(nc):
            rest = [r for r in range(nc) if r != i]
            _, s = gp().fit(xs[b, rest, None], ys[b, rest]).predict(xs[b, i:i + 1, None],
                                                                    return_std=True)
            s2[i] = s[0] ** 2 + 1e-3
        want = np.clip(np.sqrt(s2 / s2[:nc].mean()), 1 / 20, 20)
        np.testing.assert_allclose(unit[b, :, 0] / unit_loo[b, 0, 0], want,
                                   rtol=2e-3)
        assert want[nc] < 0.3 < 3.0 < want[nc + 2] < want[nc + 3]
        assert want[nc + 3] == pytest.approx(np.sqrt(1.001 / s2[:nc].mean()))  # the prior's
    # the log unit (in context stds), then the LOO residual and the 2 fits in the unit
    log_unit = loo_layer(x, y, q)[0].numpy()[..., -4] + np.log(unit / unit_loo)[..., 0]
    np.testing.assert_allclose(feats[..., -4], log_unit, rtol=1e-5, atol=1e-5)
    lin = np.concatenate([2.0 * cx - 1.0, np.full((2, 4, 1), 50.0, np.float32)], 1)
    for mask in (q, np.ones_like(q)):  # least squares the base; no context (the mean)
        u_gp, u_loo = gp_layer(x, lin, mask)[2].numpy(), loo_layer(x, lin, mask)[2].numpy()
        np.testing.assert_allclose(u_gp, np.broadcast_to(u_loo, u_gp.shape), rtol=1e-6)
    _assert_refused(dict(y_scale="loo_gp", ridge_penalties=(1.0,), base_fit="loo_best"),
                    "y_scale='loo_gp' .* expected kernel_length_scales",
                    "model.y_scale=loo_gp",
                    r"model.y_scale='loo_gp'.*'loo_gp' also only with kernel_length_scales")


def _gp_draws(b, nc, nq, length_scale=0.3, seed=6):
    """b 1-D GP draws (RBF kernel, length_scale) of nc context points, then nq queries:
    x, y [b, nc + nq, 1] and is_query [b, nc + nq], float32."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (b, nc + nq, 1))
    k = (np.exp(-0.5 * (x - x.transpose(0, 2, 1)) ** 2 / length_scale ** 2)
         + 1e-6 * np.eye(nc + nq))
    y = np.einsum("bij,bjk->bik", np.linalg.cholesky(k), rng.normal(size=(b, nc + nq, 1)))
    q = (np.arange(nc + nq) >= nc).astype(np.float32)[None].repeat(b, 0)
    return x.astype(np.float32), y.astype(np.float32), q


def test_loo_evidence_lets_only_the_likeliest_kernel_fit_compete_for_the_base():
    """base_fit=loo_evidence: each kernel fit's log marginal likelihood, with its signal
    variance at the maximum (-n/2 log(y'A^-1 y / n) - 1/2 log|A|), is numpy's on the
    standardised context; of the kernel fits only the likeliest competes with the ridge
    fits and the mean by leave-one-out error. On GP draws with length scale 0.3 from 12
    points the evidence picks the 0.3 fit more often than leave-one-out error does."""
    from gpicl_tf.layers import ContextStandardizer

    b, nc, nq = 256, 12, 4
    x, y, q = _gp_draws(b, nc, nq)
    scales = (0.1, 0.3, 1.0)
    kw = dict(kernel_length_scales=scales, kernel_noise=1e-3)
    ev_layer = ContextStandardizer(base_fit="loo_evidence", **kw)
    loo_layer = ContextStandardizer(base_fit="loo_best", **kw)
    feats = ev_layer(x, y, q)[0].numpy()
    w = 1.0 - q[..., None]
    n = np.sum(w, axis=1, keepdims=True)
    xs, ys = ev_layer._standardize(x, w, n)[0], ev_layer._standardize(y, w, n)[0]
    evidence = ev_layer._kernel(xs, ys * w, w, np.ones((b, 1, 1), np.float32))[3].numpy()
    xs, ys = xs.numpy()[:, :nc, 0].astype(np.float64), ys.numpy()[:, :nc, 0].astype(np.float64)
    for t in range(3):
        for j, ls in enumerate(scales):
            a = np.exp(-0.5 * (xs[t, :, None] - xs[t, None, :]) ** 2 / ls ** 2) + 1e-3 * np.eye(nc)
            quad = ys[t] @ np.linalg.solve(a, ys[t])
            want = -0.5 * nc * np.log(quad / nc) - 0.5 * np.linalg.slogdet(a)[1]
            assert evidence[t, j, 0] == pytest.approx(want, abs=2e-3 * abs(want) + 1e-3)
    # the base is one of the three fits (columns 3-5), the mean (0) or, by the evidence's
    # pick, never a fit less likely than another
    base = feats[:, :, 6]
    fits = feats[:, :, 3:6]
    picked = np.argmin(np.abs(fits - base[..., None]).sum(axis=1), axis=-1)
    likeliest = np.argmax(evidence[:, :, 0], axis=1)
    on_fit = np.abs(fits - base[..., None]).sum(axis=1).min(axis=-1) < 1e-4
    assert on_fit.mean() > 0.9
    np.testing.assert_array_equal(picked[on_fit], likeliest[on_fit])
    loo_base = loo_layer(x, y, q)[0].numpy()[:, :, 6]
    loo_pick = np.argmin(np.abs(fits - loo_base[..., None]).sum(axis=1), axis=-1)
    assert np.mean(picked == 1) > np.mean(loo_pick == 1) + 0.05, (np.mean(picked == 1),
                                                                   np.mean(loo_pick == 1))
    _assert_refused(dict(base_fit="loo_evidence", ridge_penalties=(1.0,)),
                    "base_fit='loo_evidence' .* expected kernel_length_scales",
                    "model.base_fit=loo_evidence", r"model.base_fit='loo_evidence'.*"
                    r"\('loo_evidence' and 'loo_bma' with kernel_length_scales\)")


def test_loo_bma_lets_the_evidence_weighted_average_of_the_kernel_fits_compete():
    """base_fit=loo_bma: where a kernel fit wins, the base is the kernel fits' average
    weighted by softmax(evidence), at queries and context points alike; with
    y_scale=loo_gp the unit at a query is proportional to the mixture's predictive std,
    sqrt(sum_l w_l (s2_l v_l + (f_l - f)^2)) (numpy's, per task up to one factor). On GP
    draws with length scale 0.3 from 12 points, the average misses the queries less than
    the single likeliest fit does (loo_evidence)."""
    from gpicl_tf.layers import ContextStandardizer

    b, nc, nq = 256, 12, 4
    x, y, q = _gp_draws(b, nc, nq)
    scales, noise = (0.1, 0.3, 1.0), 1e-3
    kw = dict(kernel_length_scales=scales, kernel_noise=noise, y_scale="loo_gp")
    layer = ContextStandardizer(base_fit="loo_bma", **kw)
    feats, loc, unit = (v.numpy() for v in layer(x, y, q))
    w = 1.0 - q[..., None]
    n = np.sum(w, axis=1, keepdims=True)
    xs, ys = layer._standardize(x, w, n)[0], layer._standardize(y, w, n)[0]
    evidence = layer._kernel(xs, ys * w, w, np.ones((b, 1, 1), np.float32))[3].numpy()
    wts = np.exp(evidence[..., 0] - evidence[..., 0].max(axis=1, keepdims=True))
    wts /= wts.sum(axis=1, keepdims=True)  # (B, L)
    base, fits = feats[:, :, 6], feats[:, :, 3:6]  # context tokens: no fit_loo, the fits
    on_kernel = np.abs(base).max(axis=1) > 0  # not the mean (base 0)
    assert on_kernel.mean() > 0.9
    np.testing.assert_allclose(base[on_kernel], np.einsum("bnl,bl->bn", fits, wts)[on_kernel],
                               atol=2e-4)
    assert np.mean(wts.max(axis=1) < 0.9) > 0.15  # an average, not one fit, in many tasks
    xs, ys = xs.numpy()[..., 0].astype(np.float64), ys.numpy()[..., 0].astype(np.float64)
    checked = 0
    for t in np.flatnonzero(on_kernel)[:8]:
        mix = np.zeros(nq)
        f_bar = np.einsum("nl,l->n", fits[t, nc:].astype(np.float64), wts[t])
        for j, ls in enumerate(scales):
            kern = lambda u, v: np.exp(-0.5 * (u[:, None] - v[None]) ** 2 / ls ** 2)
            a = kern(xs[t, :nc], xs[t, :nc]) + noise * np.eye(nc)
            ks = kern(xs[t, nc:], xs[t, :nc])
            v = 1 + noise - np.einsum("qi,qi->q", ks, np.linalg.solve(a, ks.T).T)
            s2 = ys[t, :nc] @ np.linalg.solve(a, ys[t, :nc]) / nc
            mix += wts[t, j] * (s2 * v + (fits[t, nc:, j] - f_bar) ** 2)
        want = np.sqrt(mix / mix[0])
        got = unit[t, nc:, 0] / unit[t, nc, 0]
        if np.all((got > 0.06) & (got < 15)):  # not at the unit's clip
            np.testing.assert_allclose(got, want, rtol=2e-2)
            checked += 1
    assert checked >= 5
    ev_loc = ContextStandardizer(base_fit="loo_evidence", **kw)(x, y, q)[1].numpy()
    err = lambda v: np.mean(np.square(v[:, nc:] - y[:, nc:]))
    assert err(loc) < 0.97 * err(ev_loc), (err(loc), err(ev_loc))


def test_the_base_fit_extrapolates_a_linear_task_beyond_3_stds_from_8_context_points():
    """base_fit=loo_best clips the picked fit to +-3 context stds below 8 context points
    (a fit picked from a handful of points can extrapolate far), +-3 n / 8 up to +-6 from
    there: from 16 points least squares is right beyond +-3 (2-14 of 64 noise-free linear
    Garg tasks at k = 16 have such a query) and the base then equals the line."""
    from gpicl_tf.layers import ContextStandardizer

    rng = np.random.default_rng(4)
    layer = ContextStandardizer(ridge_penalties=(1e-3,), kernel_length_scales=(0.3,),
                                base_fit="loo_best")
    for k, clip in ((4, 3.0), (8, 3.0), (12, 4.5), (16, 6.0), (32, 6.0)):
        x = rng.uniform(-0.2, 0.2, (1, k + 3, 2)).astype(np.float32)
        x[0, k:] = [[0.8, 0.8], [-0.8, -0.8], [0.05, 0.0]]  # queries far out, and one inside
        y = (x @ np.array([[3.0], [1.0]], np.float32) + 2.0).astype(np.float32)
        q = (np.arange(k + 3) >= k).astype(np.float32)[None]
        _, loc, _ = layer(x, y * (1 - q[..., None]), q)
        cy = y[0, :k, 0]
        z_true = (y[0, k:, 0] - cy.mean()) / cy.std()
        z_base = (loc.numpy()[0, k:, 0] - cy.mean()) / cy.std()
        assert np.abs(z_true[:2]).min() > 6.0, z_true  # both far queries beyond any clip
        np.testing.assert_allclose(np.abs(z_base[:2]), clip, rtol=1e-4)
        np.testing.assert_allclose(z_base[2], z_true[2], atol=1e-3)  # inside: the line
    x = rng.uniform(-1, 1, (1, 19, 2)).astype(np.float32)
    y = (x @ np.array([[3.0], [1.0]], np.float32) + 2.0).astype(np.float32)
    q = (np.arange(19) >= 16).astype(np.float32)[None]
    x[0, 16] = [1.6, 1.6]  # beyond 3 stds of the context's y, within 6
    y[0, 16] = 3.0 * 1.6 + 1.6 + 2.0
    _, loc, _ = layer(x, y * (1 - q[..., None]), q)
    cy = y[0, :16, 0]
    assert 3.0 < (y[0, 16, 0] - cy.mean()) / cy.std() < 6.0
    # ridge 1e-3 shrinks the line by about 1e-4 of itself; a clip at 3 would miss by > 0.5 std
    np.testing.assert_allclose(loc.numpy()[0, 16:, 0], y[0, 16:, 0], atol=1e-3 * cy.std())


def test_a_failed_cholesky_factorisation_is_refused_not_passed_on_as_nans():
    """The kernel fits' Cholesky factor checks its diagonal only (keras.ops.cholesky checks
    every entry, a sixth of the fits' time): a matrix that is not positive definite still
    raises, naming the factorisation, and a positive definite one gets TensorFlow's factor."""
    from gpicl_tf.layers import _cholesky

    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 5, 5))
    spd = m @ np.transpose(m, (0, 2, 1)) + 5 * np.eye(5)
    np.testing.assert_array_equal(_cholesky(tf.constant(spd)).numpy(),
                                  tf.linalg.cholesky(spd).numpy())
    bad = spd.copy()
    bad[1] = [[1.0 if i == j else 2.0 for j in range(5)] for i in range(5)]  # eigenvalue -1
    for fn in (_cholesky, tf.function(_cholesky)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="Cholesky decomposition failed"):
            fn(tf.constant(bad))
