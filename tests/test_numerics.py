"""Scale-free numerics (issue 10, item 1): predictions are equivariant to
(a*x + b, c*y + d) over float32's useful range, for the Keras model, the export's
signature and the estimator; unrepresentable inputs are refused, never NaN."""

import numpy as np
import pytest
import tensorflow as tf

from gpicl_tf import InContextRegressor
from gpicl_tf.model import masked_inputs

SCALES = (1e-6, 1e-3, 1.0, 1e3, 1e6)


def _task(seed=0, b=3, nc=8, nq=5, d=1):
    rng = np.random.default_rng(seed)
    cx = rng.uniform(-1, 1, (b, nc, d))
    cy = np.sin(3 * cx.sum(-1, keepdims=True)) + 0.3 * rng.normal(size=(b, nc, 1))
    return cx, cy, rng.uniform(-1, 1, (b, nq, d))


def _grid():
    # Shifts of up to 1e3 spreads (1e6 in absolute terms at scale 1e3): float32 keeps
    # 1e-3 of the spread only while the offset is within ~1e3 spreads of it.
    for a in SCALES:
        for c in SCALES:
            for shift in (0.0, 1e3, -1e3):
                yield a, c, shift * a, -shift * c


def _check_equivariance(predict, d=1):
    cx, cy, qx = _task(d=d)
    worst = 0.0
    for a, c, b, dd in _grid():
        f32 = lambda v: np.asarray(v, np.float32)
        cx2, qx2, cy2 = f32(a * cx + b), f32(a * qx + b), f32(c * cy + dd)
        # The base task that the float32 inputs represent exactly.
        base = predict((cx2.astype(np.float64) - b) / a, (cy2.astype(np.float64) - dd) / c,
                       (qx2.astype(np.float64) - b) / a)
        got = np.asarray(predict(cx2, cy2, qx2), np.float64)
        err = np.abs(got - (c * base + dd)).max() / (c * cy.std())
        assert np.isfinite(got).all(), (a, c, b, dd)
        assert err < 1e-3, (a, c, b, dd, err)
        worst = max(worst, err)
    return worst


def test_keras_model_is_equivariant_over_the_scale_grid(tiny_keras_model):
    model = tiny_keras_model

    def predict(cx, cy, qx):
        out = model(masked_inputs(np.float32(cx), np.float32(cy), np.float32(qx)))
        return out.numpy()[:, cx.shape[1]:]

    _check_equivariance(predict)


def test_signature_is_equivariant_over_the_scale_grid(tiny_export_dir):
    sig = tf.saved_model.load(f"{tiny_export_dir}/1").signatures["serving_default"]
    predict = lambda cx, cy, qx: sig(context_x=tf.constant(cx, tf.float32),
                                     context_y=tf.constant(cy, tf.float32),
                                     query_x=tf.constant(qx, tf.float32))["mean"].numpy()
    _check_equivariance(predict)


def test_signature_is_equivariant_per_feature_at_width_2(tiny_export_2d):
    sig = tf.saved_model.load(f"{tiny_export_2d}/1").signatures["serving_default"]
    cx, cy, qx = _task(d=2)
    cy = np.concatenate([cy, cx[..., :1] ** 2], -1)
    run = lambda cx, cy, qx: sig(context_x=tf.constant(cx, tf.float32),
                                 context_y=tf.constant(cy, tf.float32),
                                 query_x=tf.constant(qx, tf.float32))["mean"].numpy()
    a, b = np.array([1e-3, 1e4]), np.array([5.0, -2e6])  # each feature its own map
    c, d = np.array([1e5, 1e-4]), np.array([-3e7, 2e-2])  # offsets <= ~400 spreads
    tx, ty, tq = (np.float32(a * cx + b), np.float32(c * cy + d), np.float32(a * qx + b))
    # The baseline is the request's own float32 values mapped back (in float64): the
    # rounding of the mapped inputs to float32 is the caller's, not the model's.
    back = lambda t, s, o: np.float32((t.astype(np.float64) - o) / s)
    base = run(back(tx, a, b), back(ty, c, d), back(tq, a, b))
    got = run(tx, ty, tq)
    np.testing.assert_allclose((got - d) / c, base, atol=2e-3 * cy.std())


def test_estimator_is_equivariant_over_the_scale_grid_and_any_float64_shift(tiny_export_dir):
    cx, cy, qx = _task(b=1, nc=12)
    X, y, Xq = cx[0], cy[0, :, 0], qx[0]
    X, y, Xq = X.astype(np.float64), y.astype(np.float64), Xq.astype(np.float64)
    # The model's path over the whole grid; the default linear base (cross-validated on
    # the context: 11 model calls a fit) at the grid's corners, where it must also pick
    # the same base as on the unmapped data.
    model_only = InContextRegressor(tiny_export_dir, linear_base="none")
    auto = InContextRegressor(tiny_export_dir)
    picked = auto.fit(X, y).linear_base_
    for a in SCALES:
        for c in SCALES:
            corner = a in (SCALES[0], SCALES[-1]) and c in (SCALES[0], SCALES[-1])
            for b, d in ((0.0, 0.0), (1e6, -1e6), (-1e6 * a, 1e3 * c)):
                for est in (model_only, auto) if corner else (model_only,):
                    tX, ty, tXq = a * X + b, c * y + d, a * Xq + b
                    got = est.fit(tX, ty).predict(tXq)
                    if est is auto:
                        assert est.linear_base_ == picked, (a, c, b, d)
                    # The baseline is the mapped data's own float64 values mapped back:
                    # their rounding (up to 1e-4 of the spread at a = 1e-6, b = 1e6) is
                    # the caller's.
                    base = est.fit((tX - b) / a, (ty - d) / c).predict((tXq - b) / a)
                    np.testing.assert_allclose((got - d) / c, base, atol=1e-3 * y.std(),
                                               err_msg=str((a, c, b, d, est.linear_base)))


def test_huge_values_predict_finite_numbers_not_nan(tiny_export_dir):
    sig = tf.saved_model.load(f"{tiny_export_dir}/1").signatures["serving_default"]
    cx, cy, qx = _task()
    run = lambda y: sig(context_x=tf.constant(cx, tf.float32), context_y=tf.constant(y, tf.float32),
                        query_x=tf.constant(qx, tf.float32))["mean"].numpy()
    big = run(1e19 * cy)  # squares of 1e19 overflow float32
    assert np.isfinite(big).all()
    np.testing.assert_allclose(big / 1e19, run(cy), atol=1e-4 * cy.std())


@pytest.mark.parametrize("field", ["context_x", "context_y", "query_x"])
def test_values_beyond_float32_arithmetic_are_refused_by_the_signature(tiny_export_dir, field):
    sig = tf.saved_model.load(f"{tiny_export_dir}/1").signatures["serving_default"]
    req = dict(zip(("context_x", "context_y", "query_x"), _task()))
    req[field] = req[field] * 1e38
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"{field}: expected values of magnitude at most 1e\\+36"):
        sig(**{k: tf.constant(v, tf.float32) for k, v in req.items()})


def test_a_constant_context_predicts_its_constant(tiny_export_dir):
    cx, _, qx = _task(b=1)
    est = InContextRegressor(tiny_export_dir).fit(cx[0], np.full(8, 1e6 + 3.0))
    np.testing.assert_allclose(est.predict(qx[0]), 1e6 + 3.0, rtol=1e-9)
