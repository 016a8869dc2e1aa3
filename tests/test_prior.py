"""The `prior` task family (issue 4/7): a broad prior over functions."""

import numpy as np
import pytest
import tensorflow as tf

from gpicl_tf import data as data_lib
from gpicl_tf import tasks
from gpicl_tf.config import apply_overrides, get_preset

WEIGHTS = (("mlp", 0.35), ("gp", 0.25), ("linear", 0.15), ("sparse_linear", 0.1),
           ("tree", 0.15))


def _cfg(*overrides, d=4):
    return apply_overrides(get_preset("tiny"), ["task.family=prior", f"task.x_dim={d}",
                                                "task.min_x_dim=1", *overrides]).task


def _only(component, *overrides, d=4):
    """Noise-free tasks of one component, y on its natural scale (standardised once)."""
    return _cfg(f'task.prior_weights=[["{component}", 1.0]]', "task.prior_noise_free=1.0",
                "task.n_points=40", *overrides, d=d)


def test_each_component_appears_with_its_configured_probability():
    fam = tasks.get_family("prior")(_cfg())
    picks = fam.pick(tf.constant([0, 1], tf.int64), 10000).numpy()
    counts = np.bincount(picks, minlength=len(fam.components))
    for name, w in WEIGHTS:
        n = counts[fam.components.index(name)]
        sigma = np.sqrt(10000 * w * (1 - w))
        assert abs(n - 10000 * w) < 3 * sigma, (name, n)


def test_a_component_of_weight_zero_never_appears():
    fam = tasks.get_family("prior")(_cfg('task.prior_weights=[["mlp", 1.0], ["tree", 0.0]]'))
    picks = fam.pick(tf.constant([0, 2], tf.int64), 5000).numpy()
    assert set(picks) == {fam.components.index("mlp")}


def test_every_draw_is_finite_and_not_constant():
    b = data_lib.sample_batch(_cfg("task.n_points=32"), seed=0, n=4000)
    x, y = b["x"].numpy(), b["y"].numpy()
    assert np.isfinite(x).all() and np.isfinite(y).all()
    assert (y.std(1) > 0.5).all()  # standardised per task: no flat or broken task


def test_the_stream_is_a_pure_function_of_seed_and_step():
    cfg = _cfg()
    a = next(iter(data_lib.make_dataset(cfg, seed=3, global_batch=16, start_step=5)))
    b = next(iter(data_lib.make_dataset(cfg, seed=3, global_batch=16, start_step=5)))
    c = next(iter(data_lib.make_dataset(cfg, seed=3, global_batch=16, start_step=6)))
    for k in ("x", "y", "is_query"):
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert np.abs(a["y"].numpy() - c["y"].numpy()).max() > 0.1


def test_only_the_picked_components_run_and_the_draws_equal_gathering_all_of_them():
    """`pick_outputs` skips a weight-0 component (never built) and one no row picked
    (never run), and gives row i of component pick[i] exactly, as stacking every
    component's output and gathering did."""
    shape = tf.constant([4, 3, 1])

    def never_built():
        raise AssertionError("a component of weight 0 was built")

    def must_not_run():
        with tf.control_dependencies([tf.debugging.Assert(False, ["ran unpicked"])]):
            return tf.zeros(shape)

    makers = [lambda: tf.fill(shape, 1.0), never_built, must_not_run, lambda: tf.fill(shape, 3.0)]
    pick = tf.constant([3, 0, 0, 3])
    out = tf.function(lambda p: tasks.pick_outputs(p, [1.0, 0.0, 1.0, 1.0], makers, shape))(pick)
    np.testing.assert_array_equal(out.numpy()[:, :, 0], [[3] * 3, [1] * 3, [1] * 3, [3] * 3])
    # The prior's draws equal the gather over all six components, bit for bit.
    fam = tasks.get_family("prior")(_cfg(
        'task.prior_weights=[["mlp", 1], ["gp", 1], ["linear", 1], ["sparse_linear", 1], '
        '["tree", 1], ["relu2", 1]]', "task.prior_noise_free=1.0"))
    seed = tf.constant([5, 6], tf.int64)
    x = fam.sample_x(tf.constant([7, 8], tf.int64), 64, 24)
    s = tasks.split(seed, 8)
    present = tasks.present_features(x)
    d = tf.maximum(tf.reduce_sum(present, -1, keepdims=True), 1.0)
    every = tf.stack([fam._mlp(s[1], x, d), fam._gp(s[2], x, d), fam._linear(s[3], x),
                      fam._sparse_linear(s[4], x, present), fam._tree(s[5], x, present),
                      fam._relu2(s[7], x)], 1)
    picks = fam.pick(s[0], 64)
    assert len(set(picks.numpy())) == 6
    want = tf.gather(every, picks, batch_dims=1)
    mean, var = tf.nn.moments(want, axes=[1], keepdims=True)
    np.testing.assert_array_equal(fam.sample_y(seed, x).numpy(),
                                  ((want - mean) * tf.math.rsqrt(var + 1e-8)).numpy())


def _least_squares(x, y):
    """Per example: the coefficients of y on [x, 1] and the residual RMS."""
    coefs, rms = [], []
    for xi, yi in zip(x, y):
        a = np.concatenate([xi, np.ones((len(xi), 1))], 1)
        c = np.linalg.lstsq(a, yi[:, 0], rcond=None)[0]
        coefs.append(c[:-1])
        rms.append(np.sqrt(np.mean((a @ c - yi[:, 0]) ** 2)))
    return np.array(coefs), np.array(rms)


def test_linear_and_sparse_linear_tasks_are_linear_and_sparse_ones_use_at_most_3_features():
    for comp, most in (("linear", 8), ("sparse_linear", 3)):
        b = data_lib.sample_batch(_only(comp, d=8), seed=1, n=64)
        coefs, rms = _least_squares(b["x"].numpy(), b["y"].numpy())
        assert rms.max() < 1e-4, comp
        used = (np.abs(coefs) > 1e-4).sum(1)
        assert used.max() <= most and used.max() >= min(3, most), (comp, used)
    # sparse tasks use exactly min(3, d) of the example's own features
    b = data_lib.sample_batch(_only("sparse_linear", d=8), seed=2, n=64)
    x = b["x"].numpy()
    coefs, _ = _least_squares(x, b["y"].numpy())
    d = np.any(x != 0, axis=1).sum(1)
    np.testing.assert_array_equal((np.abs(coefs) > 1e-4).sum(1), np.minimum(3, d))


def test_trees_take_at_most_16_values_and_split_only_present_features():
    b = data_lib.sample_batch(_only("tree", d=8), seed=3, n=256)
    y = b["y"].numpy()[..., 0]
    d = np.any(b["x"].numpy() != 0, axis=1).sum(1)
    distinct = np.array([len(np.unique(np.round(v, 5))) for v in y])
    assert distinct.max() <= 16
    # a width-1 example's nodes split its one present feature: its root splits the points
    # (a split of an absent, all-zero feature would send every point the same way, and a
    # tree of such splits would be constant); along one axis a depth-4 path meets few cuts
    one = distinct[d == 1]
    assert (d == 1).sum() > 10 and one.min() >= 2 and one.mean() > 3, one


def test_noise_has_its_configured_size():
    b = data_lib.sample_batch(_cfg('task.prior_weights=[["linear", 1.0]]',
                                   "task.prior_noise=[0.2, 0.2]", "task.prior_noise_free=0.0",
                                   "task.n_points=64", d=2), seed=4, n=200)
    _, rms = _least_squares(b["x"].numpy(), b["y"].numpy())
    # noise std 0.2 on a unit-variance signal, then the task is standardised again
    assert 0.15 < np.median(rms) < 0.21, np.median(rms)


def test_mlp_and_gp_tasks_vary_smoothly_enough_to_learn():
    for comp in ("mlp", "gp"):
        b = data_lib.sample_batch(_only(comp, d=1), seed=5, n=64)
        x, y = b["x"].numpy()[..., 0], b["y"].numpy()[..., 0]
        order = np.argsort(x, 1)
        ys = np.take_along_axis(y, order, 1)
        # neighbours in x are closer in y than random pairs are
        assert np.mean(np.abs(np.diff(ys, axis=1))) < 0.6 * np.mean(np.abs(y[:, 1:] - y[:, :-1]))


@pytest.mark.parametrize("bad,match", [
    ('task.prior_weights=[["forest", 1.0]]', r"task.prior_weights=.*components?"),
    ('task.prior_weights=[["mlp", -1.0]]', r"task.prior_weights=.*weights >= 0"),
    ("task.prior_noise=[0.3, 0.1]", r"task.prior_noise=.*0 < low <= high"),
    ("task.prior_noise_free=1.5", r"task.prior_noise_free=1.5.*\[0, 1\]"),
])
def test_bad_prior_settings_are_refused_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(bad)
