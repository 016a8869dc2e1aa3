import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU-only tests; GPU tests opt in

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny():
    from gpicl_tf.config import get_preset

    return get_preset("tiny")


# Prepended to code run by run_python: any import of gpicl_tf fails, as in a TF Serving
# client's process that has TensorFlow but not this package.
NO_GPICL_TF = """import builtins
real_import = builtins.__import__
def guard(name, *a, **k):
    if name.startswith("gpicl_tf"):
        raise ImportError("gpicl_tf must not be importable here")
    return real_import(name, *a, **k)
builtins.__import__ = guard
"""


def run_python(code_or_args, timeout=600, env=None, cwd=None, check=True):
    """Runs python in a fresh process (device setup, isolation); returns CompletedProcess."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def two_phase_presets(monkeypatch, overrides=()):
    """Presets `tiny` (10 steps) and `tiny_long` (24 points, 5 steps, train.init_from
    `tiny`, then overrides), in the one preset registry for this test; returns both."""
    from gpicl_tf import config
    from gpicl_tf.config import apply_overrides, get_preset

    base = apply_overrides(get_preset("tiny"), ["train.steps=10", "train.checkpoint_every=10"])
    long = apply_overrides(base, ["name=tiny-long", "task.n_points=24", "train.steps=5",
                                  "train.init_from=tiny", *overrides])
    monkeypatch.setitem(config.PRESETS, "tiny", lambda: base)
    monkeypatch.setitem(config.PRESETS, "tiny_long", lambda: long)
    return base, long


def _tiny_model(overrides=()):
    """An untrained tiny model with a random (non-zero) output head."""
    import keras
    import tensorflow as tf

    from gpicl_tf.config import apply_overrides, get_preset
    from gpicl_tf.model import build_model

    cfg = apply_overrides(get_preset("tiny"), list(overrides))
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    for w in model.get_layer("head").weights:  # non-trivial predictions
        w.assign(tf.random.normal(w.shape, seed=5))
    return model, cfg


@pytest.fixture(scope="session")
def tiny_keras_model():
    return _tiny_model()[0]


def _export(tmp_path_factory, overrides, name):
    from gpicl_tf.export import export_model

    model, cfg = _tiny_model(overrides)
    base = str(tmp_path_factory.mktemp(name))
    export_model(model, cfg, base, "gpicl")
    return f"{base}/gpicl"


@pytest.fixture(scope="session")
def tiny_export_dir(tmp_path_factory):
    """exports/gpicl with version 1 of an untrained tiny model (x_dim=1, y_dim=1)."""
    return _export(tmp_path_factory, [], "ex1d")


@pytest.fixture(scope="session")
def tiny_export_2d(tmp_path_factory):
    """An untrained tiny model with x_dim=2, y_dim=2."""
    return _export(tmp_path_factory, ["task.x_dim=2", "task.y_dim=2"], "ex2d")


@pytest.fixture(scope="session")
def tiny_export_d8(tmp_path_factory):
    """An untrained tiny model for inputs of width 1 to 8 (task.x_dim=8, min_x_dim=1), told
    which features are present as the `default` model is (model.absent_features=flags)."""
    return _export(tmp_path_factory, ["task.x_dim=8", "task.min_x_dim=1",
                                      "model.absent_features=flags"], "exd8")


@pytest.fixture(scope="session")
def tiny_export_d8_fits(tmp_path_factory):
    """tiny_export_d8 with the `default` model's other token features: the context's ridge
    fits and RBF-kernel GP fits."""
    return _export(tmp_path_factory, ["task.x_dim=8", "task.min_x_dim=1",
                                      "model.absent_features=flags",
                                      "model.ridge_penalties=[0.001,1]",
                                      "model.kernel_length_scales=[0.15,1]"], "exd8fits")


@pytest.fixture(scope="session")
def tiny_export_d10(tmp_path_factory):
    """An untrained tiny model for inputs of width 1 to 10: wide enough for every
    scikit-learn estimator check (the widest feeds 10 features)."""
    return _export(tmp_path_factory, ["task.x_dim=10", "task.min_x_dim=1"], "exd10")


def ridge_residual_reference(export, X, y):
    """(the model with linear_base="none" fitted on the residuals of RidgeCV over
    BASE_ALPHAS (fit on standardised x and y), the ridge's prediction as a function):
    what InContextRegressor(linear_base="ridge") is defined to be, for 1-D y."""
    from sklearn.linear_model import RidgeCV

    from gpicl_tf import InContextRegressor
    from gpicl_tf.estimator import BASE_ALPHAS

    loc, scale = X.mean(0), X.std(0)
    ridge = RidgeCV(alphas=BASE_ALPHAS).fit((X - loc) / scale, (y - y.mean()) / y.std())

    def base(x):
        return ridge.predict((x - loc) / scale) * y.std() + y.mean()

    return InContextRegressor(export, linear_base="none").fit(X, y - base(X)), base
