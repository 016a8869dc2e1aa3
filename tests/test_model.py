import functools

import numpy as np
import pytest
import keras
import tensorflow as tf

from gpicl_tf import data as data_lib
from gpicl_tf.config import get_preset
from gpicl_tf.layers import (ContextAttentionMask, ContextStandardizer, Destandardize,
                             TransformerBlock)
from gpicl_tf.losses import masked_query_loss, query_sse_and_count
from gpicl_tf.model import build_model, model_inputs

ATOL = 2e-5


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = build_model(get_preset("tiny"))
    # Random, non-zero head so predictions depend on everything they may depend on.
    for w in m.get_layer("head").weights:
        w.assign(tf.random.normal(w.shape, seed=1))
    return m


def _task(n_ctx=6, n_q=5, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, n_ctx + n_q, 1)).astype(np.float32)
    y = (np.sin(3 * x) * scale).astype(np.float32)
    q = np.concatenate([np.zeros((2, n_ctx)), np.ones((2, n_q))], 1).astype(np.float32)
    return x, y, q


def _pred(model, x, y, q):
    return model({"x": x, "y": y, "is_query": q}).numpy()


def test_query_prediction_ignores_other_queries(model):
    x, y, q = _task()
    base = _pred(model, x, y, q)
    x2, y2 = x.copy(), y.copy()
    x2[:, 7:] += 0.37  # change every other query's input and (hidden) target
    y2[:, 6:] = 99.0
    changed = _pred(model, x2, y2, q)
    np.testing.assert_allclose(changed[:, 6], base[:, 6], atol=ATOL)
    # Remove all queries but the first; add 20 more queries.
    alone = _pred(model, x[:, :7], y[:, :7], q[:, :7])
    np.testing.assert_allclose(alone[:, 6], base[:, 6], atol=ATOL)
    xm = np.concatenate([x, np.random.default_rng(1).uniform(-1, 1, (2, 20, 1))], 1)
    more = _pred(model, xm.astype(np.float32), np.concatenate([y, np.zeros((2, 20, 1))], 1)
                 .astype(np.float32), np.concatenate([q, np.ones((2, 20))], 1).astype(np.float32))
    np.testing.assert_allclose(more[:, :11][q > 0], base[q > 0], atol=ATOL)


def test_permuting_context_points_does_not_change_predictions(model):
    x, y, q = _task()
    base = _pred(model, x, y, q)
    perm = np.r_[np.random.default_rng(2).permutation(6), np.arange(6, 11)]
    out = _pred(model, x[:, perm], y[:, perm], q[:, perm])
    np.testing.assert_allclose(out[:, 6:], base[:, 6:], atol=ATOL)


def test_predictions_change_with_the_context(model):
    x, y, q = _task()
    y2 = y.copy()
    y2[:, :6] *= -1
    assert not np.allclose(_pred(model, x, y2, q)[:, 6:], _pred(model, x, y, q)[:, 6:], atol=1e-3)


def test_affine_rescaling_of_x_and_y_carries_to_predictions(model):
    x, y, q = _task()
    base = _pred(model, x, y, q)
    out = _pred(model, x * 50.0 - 3.0, y * 1000.0 + 5.0, q)
    np.testing.assert_allclose(out[:, 6:], base[:, 6:] * 1000.0 + 5.0, rtol=1e-3, atol=1e-2)


def test_mask_lets_points_see_context_and_themselves_only():
    q = tf.constant([[0.0, 1.0, 0.0, 1.0]])
    m = ContextAttentionMask()(q).numpy()[0]
    expected = np.array([[1, 0, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
    np.testing.assert_array_equal(m, expected)


def _multi_head_attention(block):
    """The attention sublayer as it was computed before the fused projection: the block's
    own keras.layers.MultiHeadAttention called on its weights (the reference path of
    benchmarks/attention_paths.py)."""
    from benchmarks.attention_paths import multi_head_attention_call

    return functools.partial(multi_head_attention_call, block)


@pytest.mark.parametrize("key_dim", [16, 8])  # heads x key_dim = D, and not
@pytest.mark.parametrize("jit", [False, True])
def test_block_attention_equals_multi_head_attention_on_its_weights(key_dim, jit):
    keras.utils.set_random_seed(3)
    blk = TransformerBlock(64, 4, key_dim, 128, residual_scale=0.5)
    h = tf.random.normal([3, 20, 64])
    blk.build(h.shape)
    for w in blk.attn.weights:  # every projection and bias non-trivial
        w.assign(tf.random.normal(w.shape, stddev=0.3))
    mask = ContextAttentionMask()(tf.constant(np.random.default_rng(0).random((3, 20)) < 0.4,
                                              tf.float32))
    new = tf.function(blk.attention, jit_compile=jit)(h, mask).numpy()
    old = tf.function(_multi_head_attention(blk), jit_compile=jit)(h, mask).numpy()
    scale = np.abs(old).max()
    assert scale > 1.0
    # float32 rounding of 1/sqrt(key_dim) folded into the query projection, relative to the
    # output's scale (bit for bit when key_dim is a power of 4)
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-5 * scale)
    # the mask is obeyed: a masked-out point's value does not reach the output
    h2 = h.numpy()
    h2[0, np.flatnonzero(~mask.numpy()[0, 0])[0]] += 5.0
    np.testing.assert_allclose(blk.attention(tf.constant(h2), mask).numpy()[0, 0], new[0, 0],
                               atol=1e-5)


def test_training_loss_matches_the_multi_head_attention_step():
    """The model's predictions with the fused attention path equal those with
    MultiHeadAttention's path on the same weights within 1e-5, and after 12 tiny Adam
    steps under XLA the losses of the two agree within 1e-4."""
    cfg = get_preset("tiny")
    batches = list(data_lib.make_dataset(cfg.task, 0, 16).take(12))
    losses, preds = {}, {}
    for path in ("fused", "mha"):
        keras.utils.set_random_seed(0)
        m = build_model(cfg)
        if path == "mha":
            for i in range(m.n_layers):
                blk = m.get_layer(f"block_{i}")
                blk.attention = _multi_head_attention(blk)
        for w in m.get_layer("head").weights:  # a non-zero head: predictions see the trunk
            w.assign(tf.random.normal(w.shape, seed=1))
        preds[path] = m(model_inputs(batches[0])).numpy()
        opt = keras.optimizers.Adam(1e-3)

        @tf.function(jit_compile=True)
        def step(b):
            with tf.GradientTape() as tape:
                loss = masked_query_loss(b["y"], m(model_inputs(b), training=True),
                                         b["is_query"])
            opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables),
                                    m.trainable_variables))
            return loss

        losses[path] = [float(step(b)) for b in batches]
    assert np.abs(preds["mha"]).max() > 0.1
    np.testing.assert_allclose(preds["fused"], preds["mha"], rtol=0, atol=1e-5)
    assert losses["fused"][-1] < losses["fused"][0]  # it trains
    np.testing.assert_allclose(losses["fused"], losses["mha"], rtol=0, atol=1e-4)


def test_standardizer_ignores_query_targets():
    x = tf.constant([[[0.0], [2.0], [5.0]]])
    y = tf.constant([[[1.0], [3.0], [100.0]]])
    q = tf.constant([[0.0, 0.0, 1.0]])
    feats, loc, scale = ContextStandardizer()(x, y, q)
    np.testing.assert_allclose(loc.numpy().ravel(), [2.0])
    np.testing.assert_allclose(scale.numpy().ravel(), [1.0], atol=1e-5)
    assert feats.numpy()[0, 2, 1] == 0.0  # the query's y is zeroed
    assert feats.numpy()[0, 2, 2] == 1.0  # and flagged


def test_masked_loss_counts_only_queries_and_splits_exactly():
    y = tf.constant(np.arange(24, dtype=np.float32).reshape(4, 3, 2))
    pred = y + tf.constant([[[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]]] * 4)
    q = tf.constant([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    full = float(masked_query_loss(y, pred, q))
    np.testing.assert_allclose(full, (4 * 25.0 + 1.0) / 7.0, rtol=1e-6)
    # Replicas with different query counts: local sums over the global count add up.
    total = sum(float(masked_query_loss(y[i:i + 2], pred[i:i + 2], q[i:i + 2], "mse", 7.0))
                for i in (0, 2))
    np.testing.assert_allclose(total, full, rtol=1e-6)
    sse, count = query_sse_and_count(y, pred, q)
    assert float(count) == 7.0


def _roundtrip(layer, *inputs):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    return clone


def test_layers_round_trip_config():
    assert _roundtrip(ContextStandardizer(eps=1e-4)).eps == 1e-4
    _roundtrip(ContextAttentionMask())
    _roundtrip(Destandardize())
    blk = _roundtrip(TransformerBlock(32, 2, 16, 64, residual_scale=0.5))
    assert (blk.d_model, blk.n_heads, blk.key_dim, blk.mlp_dim) == (32, 2, 16, 64)


def test_every_layer_of_the_package_is_registered_for_keras_files():
    import inspect

    from gpicl_tf import layers

    classes = [c for _, c in inspect.getmembers(layers, inspect.isclass)
               if issubclass(c, keras.layers.Layer) and c.__module__ == layers.__name__]
    assert {"BarHead", "ContextStandardizer", "TransformerBlock"} <= {c.__name__ for c in classes}
    for c in classes:
        assert keras.saving.get_registered_name(c) == f"{layers.PACKAGE}>{c.__name__}", c


def test_model_round_trips_through_get_config_and_keras_file(model, tmp_path):
    x, y, q = _task()
    base = _pred(model, x, y, q)
    from gpicl_tf.model import InContextTransformer

    config = model.get_config()  # the model's own hyperparameters, no experiment config
    assert {k: config[k] for k in ("x_dim", "y_dim", "d_model", "n_layers", "n_heads")} == {
        "x_dim": 1, "y_dim": 1, "d_model": 32, "n_layers": 2, "n_heads": 2}
    clone = InContextTransformer.from_config(config)
    assert isinstance(model, InContextTransformer)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(_pred(clone, x, y, q), base, atol=1e-6)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(_pred(loaded, x, y, q), base, atol=1e-6)
    assert sorted(i.name for i in loaded.inputs) == ["is_query", "x", "y"]


def test_model_output_shape_for_multi_dim_tasks():
    from gpicl_tf.config import apply_overrides

    cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=3", "task.y_dim=2"])
    m = build_model(cfg)
    b = data_lib.sample_batch(cfg.task, 0, 4, n_context=5)
    assert m({k: b[k] for k in ("x", "y", "is_query")}).shape == (4, 16, 2)


def test_cross_entropy_query_loss_splits_exactly_over_replicas():
    rng = np.random.default_rng(0)
    y = tf.one_hot(rng.integers(0, 5, (4, 6)), 5)
    logits = tf.constant(rng.normal(size=(4, 6, 5)), tf.float32)
    q = tf.constant((rng.uniform(size=(4, 6)) > 0.4).astype(np.float32))
    full = float(masked_query_loss(y, logits, q, "cross_entropy"))
    ce = tf.nn.softmax_cross_entropy_with_logits(y, logits).numpy()
    np.testing.assert_allclose(full, (ce * q.numpy()).sum() / q.numpy().sum(), rtol=1e-6)
    n = float(tf.reduce_sum(q))
    total = sum(float(masked_query_loss(y[i:i + 2], logits[i:i + 2], q[i:i + 2],
                                        "cross_entropy", n)) for i in (0, 2))
    np.testing.assert_allclose(total, full, rtol=1e-6)



def test_tanh_gelu_is_the_approximation_and_survives_keras_files(model, tmp_path):
    """model.gelu="tanh": the MLP applies 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))),
    the model otherwise equals the exact-GELU one on the same weights, and a .keras file
    (safe mode) brings the approximation back."""
    from gpicl_tf.config import apply_overrides
    from gpicl_tf.model import InContextTransformer

    cfg = apply_overrides(get_preset("tiny"), ["model.gelu=tanh"])
    approx = build_model(cfg)
    approx.set_weights(model.get_weights())
    blk = approx.get_layer("block_0")
    h = tf.random.normal((2, 7, 32), seed=3)
    z = (blk.ln_mlp(h) @ blk.mlp_in.kernel + blk.mlp_in.bias).numpy().astype(np.float64)
    act = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    want = act @ blk.mlp_out.kernel.numpy() + blk.mlp_out.bias.numpy()
    np.testing.assert_allclose(blk.mlp(h).numpy(), want, atol=1e-5)
    exact = model.get_layer("block_0").mlp(h).numpy()
    assert 1e-4 < np.abs(exact - want).max() < 1e-2  # a different, nearby function
    x, y, q = _task()
    base = _pred(approx, x, y, q)
    assert not np.array_equal(base, _pred(model, x, y, q))
    assert approx.get_config()["gelu"] == "tanh"
    assert InContextTransformer.from_config(model.get_config()).get_layer("block_0").gelu == "exact"
    path = str(tmp_path / "tanh.keras")
    approx.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("block_1").gelu == "tanh"
    np.testing.assert_allclose(_pred(loaded, x, y, q), base, atol=1e-6)
    with pytest.raises(ValueError, match="model.gelu='fast' is invalid: expected one of"):
        apply_overrides(get_preset("tiny"), ["model.gelu=fast"])
