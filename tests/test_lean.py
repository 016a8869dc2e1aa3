"""The export's lean forward pass (gpicl_tf.lean) computes the Keras model's function."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from gpicl_tf.config import apply_overrides, get_preset
from gpicl_tf.lean import lean_forward, supported
from gpicl_tf.model import build_model


def _model(preset, overrides):
    cfg = apply_overrides(get_preset(preset), list(overrides))
    keras.utils.set_random_seed(1)
    model = build_model(cfg)
    for w in model.trainable_weights:  # every weight non-trivial (heads start at zero)
        w.assign(w + tf.random.normal(w.shape, stddev=0.2, seed=7))
    return model, cfg


def _batch(cfg, b=3, n=20, seed=0):
    rng = np.random.default_rng(seed)
    t = cfg.task
    x = rng.uniform(-1, 1, (b, n, t.x_dim)).astype(np.float32)
    x[min(1, b - 1), :, t.x_dim_min:] = 0.0  # a narrower task (absent features)
    if t.kind == "classification":
        y = np.eye(t.y_dim, dtype=np.float32)[rng.integers(0, t.y_dim, (b, n))]
    else:
        y = rng.normal(size=(b, n, t.y_dim)).astype(np.float32) * 3.0 + 5.0
    q = (rng.uniform(size=(b, n)) < 0.4).astype(np.float32)
    q[b - 1, 1:] = 1.0  # a task with a single context point
    return x, y * (1 - q[..., None]), q


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", []),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.absent_features=flags"]),
    ("tiny", ["model.head=bar", "model.n_bins=16"]),
    ("tiny", ["model.gelu=tanh"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]", "model.fit_loo=true"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]", "model.base_fit=loo_best",
              "model.y_scale=student_t", "model.head=bar", "model.n_bins=16"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]", "model.base_fit=loo_best",
              "model.y_scale=loo", "model.head=bar", "model.n_bins=16"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]", "model.base_fit=loo_best",
              "model.y_scale=loo", "model.kernel_std=true", "model.head=bar",
              "model.n_bins=16"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]", "model.base_fit=loo_best",
              "model.y_scale=loo_gp", "model.kernel_std=true", "model.head=bar",
              "model.n_bins=16"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.kernel_length_scales=[0.3,1]", "model.base_fit=loo_bma",
              "model.y_scale=loo_gp", "model.head=bar", "model.n_bins=16"]),
    ("tiny", ["task.x_dim=4", "task.min_x_dim=2", "model.ridge_penalties=[0.01,3]",
              "model.cubic_penalties=[0.001,1]", "model.kernel_length_scales=[0.3,1]",
              "model.base_fit=loo_best", "model.y_scale=loo", "model.head=bar",
              "model.n_bins=16"]),
    ("classify", ["task.n_points=32", "model.d_model=32", "model.n_layers=2",
                  "model.n_heads=2", "model.mlp_ratio=2"]),
])
def test_the_lean_forward_equals_the_keras_model(preset, overrides):
    model, cfg = _model(preset, overrides)
    x, y, q = _batch(cfg)
    want = model({"x": x, "y": y, "is_query": q}, training=False)
    got = tf.function(lean_forward(model), autograph=False)(x, y, q)
    tf.nest.assert_same_structure(want, got)
    for a, b in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=2e-5 * scale, rtol=1e-5)


def test_the_lean_forward_keeps_queries_independent():
    model, cfg = _model("tiny", [])
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 16, 1)).astype(np.float32)
    y = np.sin(3 * x)
    q = np.zeros((1, 16), np.float32)
    q[0, 10:] = 1.0
    f = tf.function(lean_forward(model), autograph=False)
    base = f(x, y, q).numpy()
    x2 = x.copy()
    x2[0, 12:] = np.random.default_rng(3).uniform(-1, 1, x2[0, 12:].shape)  # other queries
    out = f(x2, y, q).numpy()
    np.testing.assert_allclose(out[0, 10:12], base[0, 10:12], atol=1e-6)
    assert np.abs(out[0, 12:] - base[0, 12:]).max() > 1e-3


def test_mixed_precision_models_keep_the_keras_graph():
    model, _ = _model("tiny", [])
    assert supported(model)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_model(get_preset("tiny"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert not supported(mixed)
