import json

import pytest

from gpicl_tf.config import ExperimentConfig, PRESETS, apply_overrides, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_json(name):
    cfg = get_preset(name)
    again = ExperimentConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["model"]["d_model"] == cfg.model.d_model


def test_paper_preset_matches_the_paper():
    m = get_preset("paper").model
    assert (m.n_layers, m.n_heads, m.head_dim, m.d_model, m.mlp_ratio) == (4, 8, 32, 256, 4)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="default.*paper.*tiny"):
        get_preset("huge")


@pytest.mark.parametrize("override,field", [
    ("model.n_heads=3", "n_heads"),            # does not divide d_model=64
    ("model.d_model=0", "d_model"),
    ("model.n_layers=-1", "n_layers"),
    ("task.x_dim=0", "x_dim"),
    ("task.y_dim=0", "y_dim"),
    ("task.n_points=1", "n_points"),
    ("task.max_context=64", "max_context"),    # queries fewer than points: >= 1 query
    ("task.min_context=70", "min_context"),
    ("task.n_tasks=0", "n_tasks"),
    ("task.family=fourier", "family"),
    ("task.noise_std=-0.1", "noise_std"),
    ("task.x_high=-2", "x_high"),
    ("task.mlp_activations=softmax", "mlp_activations"),
    ("train.learning_rate=0", "learning_rate"),
    ("train.batch_size=0", "batch_size"),
    ("train.warmup_steps=-1", "warmup_steps"),
    ("train.precision=float16", "precision"),
    ("train.loss=l1", "loss"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=rf"\.{field}="):
        apply_overrides(get_preset("default"), [override])


def test_gp_family_refuses_a_task_pool():
    with pytest.raises(ValueError, match="n_tasks.*gp_rbf"):
        apply_overrides(get_preset("tiny"), ["task.family=gp_rbf", "task.n_tasks=8"])


def test_overrides_parse_types():
    cfg = apply_overrides(get_preset("tiny"), [
        "task.n_tasks=16", "task.mlp_hidden=32,32", "train.jit_compile=false",
        "task.max_context=none", "model.key_dim=8"])
    assert cfg.task.n_tasks == 16 and cfg.task.mlp_hidden == (32, 32)
    assert cfg.train.jit_compile is False and cfg.task.max_context is None
    assert cfg.model.head_dim == 8


def test_unknown_override_field_is_named():
    with pytest.raises(ValueError, match="model.width"):
        apply_overrides(get_preset("tiny"), ["model.width=3"])


def test_default_is_the_general_learner_and_mlp1d_the_papers_setting():
    import dataclasses

    d, m = get_preset("default"), get_preset("mlp1d")
    assert (d.task.x_dim, d.task.x_dim_min, d.task.family) == (8, 1, "prior")
    assert dict(d.task.mix)["prior"] > dict(d.task.mix)["random_mlp"] > 0
    assert d.model.absent_features in ("zero", "flags", "rescale", "both")
    assert (d.model.head, d.loss, m.model.head, m.loss) == ("bar", "nll", "mse", "mse")
    assert (m.task.family, m.task.x_dim, m.task.x_dim_min, m.task.mix) == ("random_mlp", 1, 1, ())
    assert m.task.mlp_hidden == (16, 16, 16)
    for size in ("tiny", "small", "paper"):  # the phase-transition sweeps keep mlp1d's tasks
        t = get_preset(f"sweep-{size}").task
        assert dataclasses.replace(t, n_points=m.task.n_points) == m.task
    with pytest.raises(ValueError, match="model.absent_features='pad' is invalid"):
        apply_overrides(d, ["model.absent_features=pad"])


def test_gp_preset_is_the_default_learner_on_one_gps_draws():
    """`gp` (PFNs' GP experiment): the `default` model and training on 1-D draws of one GP
    with length scale 0.5, the gp_rbf_l0.5 suite's kernel (unit-variance draws whose
    correlation follows it). Its near-interpolating kernel fits have the draws' jitter as
    their noise (1e-5), and its tails stay half-normal and its ridge fits' leave-one-out
    without the intercept (its results files' head)."""
    import dataclasses

    import numpy as np

    from gpicl_tf import data as data_lib

    g, d = get_preset("gp"), get_preset("default")
    assert g.train == d.train
    assert g.model == dataclasses.replace(d.model, kernel_noises=g.model.kernel_noises,
                                          bar_tail="normal", loo_intercept=False)
    assert d.model.bar_tail == "pareto" and d.model.loo_intercept
    assert g.model.kernel_noises == (1e-5,) * 5 + (0.01,) * 3
    assert (g.task.family, g.task.x_dim, g.task.mix, g.task.gp_length_scale) == (
        "gp_rbf", 1, (), 0.5)
    # unstandardised draws of a unit-variance GP: corr(y1, y2) = exp(-(x1 - x2)^2 / (2 0.5^2))
    t = dataclasses.replace(g.task, n_points=2, standardize_y=False)
    b = data_lib.sample_batch(t, 0, 4000)
    x, y = b["x"].numpy()[..., 0], b["y"].numpy()[..., 0]
    near = np.abs(x[:, 0] - x[:, 1]) < 0.1
    assert np.corrcoef(y[near, 0], y[near, 1])[0, 1] > 0.97
    far = np.abs(x[:, 0] - x[:, 1]) > 1.5
    assert abs(np.corrcoef(y[far, 0], y[far, 1])[0, 1]) < 0.15
