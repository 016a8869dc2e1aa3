import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from conftest import NO_GPICL_TF, REPO, run_python
from gpicl_tf import export as export_lib
from gpicl_tf.model import build_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import keras

    from gpicl_tf.config import get_preset

    cfg = get_preset("tiny")
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    for w in model.get_layer("head").weights:
        w.assign(tf.random.normal(w.shape, seed=3))
    base = str(tmp_path_factory.mktemp("exports"))
    path = export_lib.export_model(model, cfg, base, "gpicl")
    return model, cfg, base, path


def _request(seed=0, b=3, nc=7, nq=4):
    rng = np.random.default_rng(seed)
    cx = rng.uniform(-2, 2, (b, nc, 1)).astype(np.float32)
    cy = (50 * np.sin(2 * cx) + 10).astype(np.float32)  # raw scale
    qx = rng.uniform(-2, 2, (b, nq, 1)).astype(np.float32)
    return cx, cy, qx


def _keras_mean(model, cx, cy, qx):
    b, nc, nq = cx.shape[0], cx.shape[1], qx.shape[1]
    x = np.concatenate([cx, qx], 1)
    y = np.concatenate([cy, np.zeros((b, nq, 1), np.float32)], 1)
    q = np.concatenate([np.zeros((b, nc)), np.ones((b, nq))], 1).astype(np.float32)
    return model({"x": x, "y": y, "is_query": q}).numpy()[:, nc:]


def test_layout_version_and_config_asset(exported):
    _, cfg, base, path = exported
    assert path == os.path.join(base, "gpicl", "1")
    assert export_lib.load_config(path) == cfg
    assert not [d for d in os.listdir(os.path.join(base, "gpicl")) if d.startswith(".tmp")]


def test_fresh_process_without_gpicl_tf_gets_the_keras_numbers(exported, tmp_path):
    model, _, _, path = exported
    cx, cy, qx = _request()
    np.savez(tmp_path / "req.npz", cx=cx, cy=cy, qx=qx)
    code = NO_GPICL_TF + f"""
import json
import numpy as np, tensorflow as tf
r = np.load({str(tmp_path / 'req.npz')!r})
m = tf.saved_model.load({path!r})
f = m.signatures["serving_default"]
out = f(context_x=tf.constant(r["cx"]), context_y=tf.constant(r["cy"]), query_x=tf.constant(r["qx"]))
print("RESULT", json.dumps({{"keys": sorted(out), "mean": out["mean"].numpy().tolist()}}))
"""
    res = json.loads(run_python(code, cwd=str(tmp_path), env={"PYTHONPATH": ""}).stdout
                     .split("RESULT", 1)[1])
    assert res["keys"] == ["mean"]
    np.testing.assert_allclose(np.array(res["mean"]), _keras_mean(model, cx, cy, qx),
                               rtol=1e-4, atol=1e-3)


def test_masked_signature_matches_keras(exported):
    model, _, _, path = exported
    loaded = tf.saved_model.load(path)
    cx, cy, qx = _request(1)
    x = np.concatenate([cx, qx], 1)
    y = np.concatenate([cy, np.zeros_like(qx)], 1)
    q = np.concatenate([np.zeros(cx.shape[:2]), np.ones(qx.shape[:2])], 1).astype(np.float32)
    out = loaded.signatures["masked"](x=x, y=y, is_query=q)["y_pred"].numpy()
    np.testing.assert_allclose(out[:, 7:], _keras_mean(model, cx, cy, qx), rtol=1e-4, atol=1e-3)


def test_saved_model_cli_lists_named_inputs_and_outputs(exported):
    _, _, _, path = exported
    cli = os.path.join(os.path.dirname(__import__("sys").executable),
                       "saved_model_cli")
    if not os.path.exists(cli):
        cli = "saved_model_cli"
    out = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("serving_default", "masked", "context_x", "context_y", "query_x",
                 "['mean']", "['y_pred']", "is_query"):
        assert name in out, name


def test_second_export_is_version_2(exported):
    model, cfg, base, _ = exported
    path = export_lib.export_model(model, cfg, base, "gpicl")
    assert path.endswith(os.path.join("gpicl", "2"))
    assert export_lib.versions(os.path.join(base, "gpicl")) == [1, 2]
    with pytest.raises(FileExistsError):
        export_lib.export_model(model, cfg, base, "gpicl", version=2)


@pytest.mark.parametrize("field,bad,message", [
    ("context_x", lambda cx: np.concatenate([cx, cx], -1), "context_x: expected last dimension"),
    ("query_x", lambda qx: np.concatenate([qx, qx], -1), "query_x: expected last dimension"),
    ("context_y", lambda cy: np.where(np.arange(cy.shape[1])[None, :, None] == 2, np.nan, cy)
     .astype(np.float32), "context_y: expected finite values"),
])
def test_signature_rejects_bad_width_and_nan(exported, field, bad, message):
    _, _, _, path = exported
    f = tf.saved_model.load(path).signatures["serving_default"]
    req = dict(zip(("context_x", "context_y", "query_x"), _request()))
    req[field] = bad(req[field])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        f(**{k: tf.constant(v) for k, v in req.items()})


def test_gpicl_export_re_exports_a_checkpoint(tmp_path):
    logdir, ex = str(tmp_path / "run"), str(tmp_path / "ex")
    run_python([os.path.join(REPO, "train_keras.py"), "--preset", "tiny", "--steps", "10",
                "--logdir", logdir, "--export-dir", ex, "--no-report"])
    assert export_lib.versions(os.path.join(ex, "tiny")) == [1]  # named after its preset
    out = run_python(["-m", "gpicl_tf.export", "--logdir", logdir, "--export-dir", ex]).stdout
    assert "exported step 10" in out
    assert export_lib.versions(os.path.join(ex, "tiny")) == [1, 2]
    out = run_python(["-m", "gpicl_tf.export", "--logdir", logdir, "--export-dir", ex,
                      "--model-name", "other"]).stdout
    assert export_lib.versions(os.path.join(ex, "other")) == [1]
    with pytest.raises(ValueError, match="expected a run directory"):
        export_lib.export_checkpoint(str(tmp_path / "missing"))
    # A name that would leave --export-dir is refused in one line, and nothing is written.
    proc = run_python(["-m", "gpicl_tf.export", "--logdir", logdir, "--export-dir", ex,
                       "--model-name", "../../escape"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--model-name='../../escape' is invalid" in proc.stderr
    assert not os.path.exists(os.path.join(ex, "..", "..", "escape"))
    with pytest.raises(ValueError, match="is invalid"):
        export_lib.export_model(None, export_lib.load_config(os.path.join(ex, "tiny", "1")),
                                ex, "../x")


def test_xla_export_gives_the_same_numbers_and_keeps_its_checks(exported, tmp_path):
    model, cfg, _, _ = exported
    path = export_lib.export_model(model, cfg, str(tmp_path), "xla", jit_compile=True)
    f = tf.saved_model.load(path).signatures["serving_default"]
    cx, cy, qx = _request(2)
    out = f(context_x=cx, context_y=cy, query_x=qx)["mean"].numpy()
    np.testing.assert_allclose(out, _keras_mean(model, cx, cy, qx), rtol=1e-4, atol=1e-3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_x: expected finite"):
        f(context_x=cx, context_y=cy, query_x=np.full_like(qx, np.nan))


def test_masked_signature_validates_is_query(exported):
    _, _, _, path = exported
    f = tf.saved_model.load(path).signatures["masked"]
    cx, cy, qx = _request(1)
    x = np.concatenate([cx, qx], 1)
    y = np.concatenate([cy, np.zeros_like(qx)], 1)
    q = np.concatenate([np.zeros(cx.shape[:2]), np.ones(qx.shape[:2])], 1).astype(np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="is_query: expected only 0"):
        f(x=x, y=y, is_query=q * 0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="x and is_query"):
        f(x=x, y=y, is_query=q[:, :-1])


def test_racing_exporters_retry_on_a_rename_conflict(exported, tmp_path, monkeypatch):
    model, cfg, _, _ = exported
    base = str(tmp_path)
    first = export_lib.export_model(model, cfg, base, "race")
    real = export_lib.versions
    calls = []

    def stale(b):  # the first listing misses version 1, as a racing exporter's would
        calls.append(b)
        return [] if len(calls) == 1 else real(b)

    monkeypatch.setattr(export_lib, "versions", stale)
    second = export_lib.export_model(model, cfg, base, "race")
    assert first.endswith("1") and second.endswith("2") and len(calls) == 2
    assert sorted(os.listdir(os.path.join(base, "race"))) == ["1", "2"]


def test_leftover_tmp_folders_of_dead_exporters_are_cleaned(exported, tmp_path):
    model, cfg, _, _ = exported
    base = tmp_path / "m"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        (base / f".tmp-3-{dead.pid}-abcdef12").mkdir(parents=True)
        (base / f".tmp-3-{live.pid}-abcdef12").mkdir()
        export_lib.export_model(model, cfg, str(tmp_path), "m")
        left = sorted(os.listdir(base))
        assert left == sorted(["1", f".tmp-3-{live.pid}-abcdef12"])  # a live one is kept
    finally:
        live.kill()


def test_model_config_signature_returns_the_config(exported):
    _, cfg, _, path = exported
    f = tf.saved_model.load(path).signatures["model_config"]
    text = f(unused=tf.constant([0.0]))["config_json"].numpy().decode()
    from gpicl_tf.config import ExperimentConfig

    assert ExperimentConfig.from_json(text) == cfg
