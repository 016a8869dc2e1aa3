import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_python, two_phase_presets
from gpicl_tf.config import apply_overrides
from gpicl_tf.evaluate import context_batch, keras_predict_fn, model_mse


def _unseen_loss(model, cfg, k=12):
    x, y, _ = context_batch(cfg, k, 128, 4, seed=99)
    return float(model_mse(keras_predict_fn(model), x, y, k).mean())


def test_tiny_training_halves_the_loss_on_unseen_tasks(tiny, tmp_path):
    from gpicl_tf.train import Trainer

    trainer = Trainer(tiny, str(tmp_path / "run"))
    before = _unseen_loss(trainer.model, tiny)
    result = trainer.train(verbose=False)
    after = _unseen_loss(trainer.model, tiny)
    assert result.step == tiny.train.steps
    assert after < 0.5 * before, (before, after)


def test_nan_stops_training_naming_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path):
    from gpicl_tf import data as data_lib
    from gpicl_tf.train import Trainer, TrainingDiverged

    cfg = apply_overrides(tiny, ["train.steps=60", "train.checkpoint_every=20",
                                 "train.steps_per_call=5"])

    def poisoned(ctx, start):  # the stream turns to NaN from step 30 on
        ds = data_lib.make_dataset(cfg.task, 0, cfg.train.batch_size, start, ctx)
        steps = tf.data.Dataset.counter(start)
        return tf.data.Dataset.zip(ds, steps).map(
            lambda b, s: {**b, "y": b["y"] + tf.where(s >= 30, np.nan, 0.0)})

    logdir = str(tmp_path / "run")
    trainer = Trainer(cfg, logdir, dataset_fn=poisoned)
    with pytest.raises(TrainingDiverged, match=r"at step 31;"):  # the first NaN step
        trainer.train(verbose=False)
    # The NaN step was never applied: the weights in memory are finite too.
    assert int(trainer.step.numpy()) == 30
    assert all(np.isfinite(w).all() for w in trainer.model.get_weights())
    again = Trainer(cfg, logdir)
    assert again.restore() == 20
    assert all(np.isfinite(w).all() for w in again.model.get_weights())


def test_a_non_finite_gradient_with_a_finite_loss_never_reaches_the_weights(tiny, tmp_path,
                                                                           monkeypatch):
    from gpicl_tf import train as train_lib

    cfg = apply_overrides(tiny, ["train.steps=40", "train.checkpoint_every=10",
                                 "train.steps_per_call=5"])
    trainer = train_lib.Trainer(cfg, str(tmp_path / "run"))
    real_loss = train_lib.masked_query_loss

    @tf.custom_gradient
    def inf_grad_from_step_23(loss):  # identity forward; an infinite gradient from step 23
        def grad(dy):
            return dy * tf.where(trainer.step >= 22, np.inf, 1.0)
        return tf.identity(loss), grad

    monkeypatch.setattr(train_lib, "masked_query_loss",
                        lambda *a, **k: inf_grad_from_step_23(real_loss(*a, **k)))
    with pytest.raises(train_lib.TrainingDiverged, match=r"gradient is not finite at step 23;"):
        trainer.train(verbose=False)
    assert int(trainer.step.numpy()) == 22
    assert all(np.isfinite(w).all() for w in trainer.model.get_weights())
    assert all(np.isfinite(v.numpy()).all() for v in trainer.optimizer.variables)
    again = train_lib.Trainer(cfg, str(tmp_path / "run"))
    assert again.restore() == 20
    assert all(np.isfinite(w).all() for w in again.model.get_weights())


def test_event_files_hold_scalars_hparams_and_an_image(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gpicl_tf.train import Trainer

    cfg = apply_overrides(tiny, ["train.steps=40", "train.eval_every=20", "train.log_every=10"])
    Trainer(cfg, str(tmp_path / "run")).train(verbose=False)
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/learning_rate", "train/steps_per_sec",
                "eval/loss_unseen_tasks"):
        assert tag in tags["tensors"], tags
    assert "eval/predictions_unseen_tasks" in tags["tensors"]
    assert len(acc.Tensors("train/loss")) == 4
    lr = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/learning_rate")]
    assert lr[0] < lr[1]  # warmup
    assert "_hparams_/session_start_info" in tags["tensors"]


@pytest.mark.parametrize("overrides", [[], ["model.kernel_length_scales=[0.3,1]"]])
def test_mirrored_strategy_on_two_devices_matches_one_device(overrides):
    """Also with kernel fits: each replica standardises its own examples outside XLA."""
    code = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from gpicl_tf.config import apply_overrides, get_preset
from gpicl_tf.train import Trainer, run_steps
import tempfile, json
cfg = apply_overrides(get_preset("tiny"), {overrides!r})  # XLA on, as in real runs
d = tempfile.mkdtemp()
one = Trainer(cfg, d + "/a", strategy=tf.distribute.get_strategy())
two = Trainer(cfg, d + "/b", strategy=tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
assert two.strategy.num_replicas_in_sync == 2
a, b = run_steps(one, 8), run_steps(two, 8)
wa = [w.ravel().tolist()[:50] for w in one.model.get_weights()]
wb = [w.ravel().tolist()[:50] for w in two.model.get_weights()]
print("RESULT", json.dumps({{"a": a, "b": b, "wa": wa, "wb": wb}}))
"""
    import json
    out = run_python(code).stdout
    res = json.loads(out.split("RESULT", 1)[1])
    np.testing.assert_allclose(res["a"], res["b"], rtol=1e-4, atol=1e-5)
    for u, v in zip(res["wa"], res["wb"]):
        np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-5)


def _train_cmd(logdir, export_dir, steps=200):
    return [sys.executable, os.path.join(REPO, "train_keras.py"), "--preset", "tiny",
            "--steps", str(steps), "--logdir", logdir, "--export-dir", export_dir,
            "--no-report", "--set", "train.checkpoint_every=20", "--set", "train.eval_every=100"]


def _final_weights(logdir):
    from gpicl_tf.config import ExperimentConfig
    from gpicl_tf.train import Trainer

    with open(os.path.join(logdir, "config.json")) as f:
        cfg = ExperimentConfig.from_json(f.read())
    t = Trainer(cfg, logdir, strategy=tf.distribute.get_strategy())
    step = t.restore()
    return step, t.model.get_weights()


@pytest.mark.slow
def test_kill_minus_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    ref = str(tmp_path / "ref")
    subprocess.run(_train_cmd(ref, str(tmp_path / "ex")), env=env, check=True,
                   capture_output=True, timeout=600)
    run = str(tmp_path / "run")
    proc = subprocess.Popen(_train_cmd(run, str(tmp_path / "ex2")), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a recorded mid-run checkpoint, then kill -9
        latest = tf.train.latest_checkpoint(os.path.join(run, "checkpoints"))
        if latest and int(latest.rsplit("-", 1)[1]) >= 60:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _final_weights(run)[0]
    assert 60 <= killed_at < 200, killed_at
    out = subprocess.run(_train_cmd(run, str(tmp_path / "ex2")), env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    assert f"resumed from {killed_at}" in out
    step_a, wa = _final_weights(ref)
    step_b, wb = _final_weights(run)
    assert step_a == step_b == 200
    for u, v in zip(wa, wb):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_the_gradient_is_all_reduced_once_per_step_under_mirrored_strategy():
    code = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from gpicl_tf.config import get_preset
from gpicl_tf.train import Trainer, run_steps
import tempfile
t = Trainer(get_preset("tiny"), tempfile.mkdtemp(),
            strategy=tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
n_vars = len(t.model.trainable_variables)
calls = []
real = tf.distribute.ReplicaContext.all_reduce
def counting(self, op, value, options=None):
    if isinstance(value, (list, tuple)) and len(value) == n_vars:
        calls.append(len(value))  # an all-reduce of the whole gradient
    return real(self, op, value, options)
tf.distribute.ReplicaContext.all_reduce = counting
run_steps(t, 1, 1)
print("GRADIENT_ALL_REDUCES", len(calls))
"""
    out = run_python(code).stdout
    # Traced once per replica (2 replicas): one gradient all-reduce per replica per step.
    assert "GRADIENT_ALL_REDUCES 2" in out, out[-300:]


@pytest.mark.parametrize("extra", [[], ["model.base_fit=loo_best"]])
def test_with_kernel_fits_the_split_xla_step_trains_like_the_plain_step(tmp_path, monkeypatch,
                                                                        extra):
    """With kernel fits and XLA, the standardisation runs outside the XLA cluster and the
    rest of the model inside it (model.trunk()); the step is the same mathematics as the
    plain (no XLA) step of the whole model: the same losses and weights after 20 steps
    (also with a base fit, whose per-point location crosses the split)."""
    from gpicl_tf.config import apply_overrides, get_preset
    from gpicl_tf.model import InContextTransformer
    from gpicl_tf.train import Trainer, run_steps

    trunks = []
    original = InContextTransformer.trunk
    monkeypatch.setattr(InContextTransformer, "trunk",
                        lambda self: trunks.append(self) or original(self))

    base = apply_overrides(get_preset("tiny"), ["task.x_dim=3", "model.head=bar",
                                                "model.n_bins=16", "model.ridge_penalties=[0.1]",
                                                "model.kernel_length_scales=[0.2,1]"] + extra)
    runs = {}
    for jit in (True, False):
        cfg = apply_overrides(base, [f"train.jit_compile={str(jit).lower()}"])
        before = len(trunks)
        t = Trainer(cfg, str(tmp_path / f"jit{jit}"), strategy=tf.distribute.get_strategy())
        runs[jit] = (run_steps(t, 20, 1), t.model.get_weights())
        assert len(trunks) - before == int(jit)  # the split step is the XLA one only
    assert np.ptp(runs[False][0]) > 0.05  # it trains
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    for u, v in zip(runs[True][1], runs[False][1]):
        np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-4)


def test_the_trunk_is_the_model_after_its_standardisation():
    from gpicl_tf.config import apply_overrides, get_preset
    from gpicl_tf.model import build_model

    for extra in (["model.head=bar", "model.n_bins=16"], [], ["task.x_dim=1"],
                  ["model.head=bar", "model.n_bins=16", "model.base_fit=loo_best"]):
        cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=3", "model.ridge_penalties=[0.1]",
                                                   "model.kernel_length_scales=[0.3]"] + extra)
        model = build_model(cfg)
        for w in model.weights:
            w.assign(tf.random.normal(w.shape, seed=1) * 0.3)
        rng = np.random.default_rng(0)
        dx = cfg.task.x_dim
        x = rng.normal(size=(2, 10, dx)).astype("float32")
        q = np.zeros((2, 10), "float32")
        q[:, 7:] = 1
        y = (rng.normal(size=(2, 10, 1)) * (1 - q[..., None])).astype("float32")
        want = model({"x": x, "y": y, "is_query": q})
        feats = model.get_layer("standardize")(x, y, q)
        got = model.trunk()([*feats, tf.constant(q)])
        tf.nest.assert_same_structure(want, got)
        for a, b in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
            assert float(np.abs(a).max()) > 0
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fifty_tiny_steps_give_the_recorded_losses(tiny, tmp_path):
    import json

    from gpicl_tf.train import Trainer, run_steps

    with open(os.path.join(REPO, "tests", "data", "tiny_50_losses.json")) as f:
        recorded = json.load(f)["losses"]
    trainer = Trainer(tiny, str(tmp_path / "run"), strategy=tf.distribute.get_strategy())
    np.testing.assert_allclose(run_steps(trainer, 50, 1), recorded, rtol=0, atol=1e-5)


def test_no_private_tensorflow_or_keras_names_in_the_package_or_benchmarks():
    """Every `._name` used in gpicl_tf/ and benchmarks/ is one the package defines itself
    (a method, an attribute it assigns, or a tfds builder hook it overrides)."""
    import re

    texts = []
    for folder in ("gpicl_tf", "benchmarks"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            texts += [(n, open(os.path.join(root, n)).read()) for n in files if n.endswith(".py")]
    defined = set()
    for _, text in texts:
        defined |= set(re.findall(r"def (_\w+)", text))
        defined |= set(re.findall(r"self\.(_\w+)(?:, self\.\w+)*\s*=", text))
        defined |= set(re.findall(r"self\.(_\w+), self\.(_\w+)\s*=", text) and
                       sum(re.findall(r"self\.(_\w+), self\.(_\w+)\s*=", text), ()))
    used = {(n, m) for n, text in texts for m in re.findall(r"\.(_[a-z]\w*)", text)}
    foreign = sorted((n, m) for n, m in used if m not in defined)
    assert not foreign, foreign


def test_a_second_phase_starts_from_the_first_phases_final_weights(tmp_path, monkeypatch):
    from gpicl_tf.train import Trainer

    base, long = two_phase_presets(monkeypatch)
    first = Trainer(base, str(tmp_path / "runs" / "tiny"))
    first.train(verbose=False)
    second = Trainer(long, str(tmp_path / "runs" / "tiny-long"))
    fresh = [w.copy() for w in second.model.get_weights()]
    assert second._open_run() == 0
    for a, b, c in zip(second.model.get_weights(), first.model.get_weights(), fresh):
        np.testing.assert_array_equal(a, b)  # the first phase's weights, exactly
    assert any(not np.array_equal(a, c) for a, c in zip(first.model.get_weights(), fresh))
    assert int(second.optimizer.iterations.numpy()) == 0  # a fresh optimiser
    result = second.train(verbose=False)
    assert result.step == 5 and np.isfinite(result.final_loss)
    trained = second.model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(trained, first.model.get_weights()))
    # A finished (or resumed) second phase restores its own checkpoint, not the first's.
    again = Trainer(long, str(tmp_path / "runs" / "tiny-long"))
    assert again._open_run() == 5
    for a, b in zip(again.model.get_weights(), trained):
        np.testing.assert_array_equal(a, b)


def test_a_second_phase_without_its_finished_first_is_refused_before_writing(
        tmp_path, monkeypatch):
    from gpicl_tf.train import Trainer

    base, long = two_phase_presets(monkeypatch)
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match=r"train.init_from='tiny'.*no checkpoint there; "
                                         r"train it first: python train_keras.py --preset "
                                         r"tiny --logdir .*runs/tiny$"):
        Trainer(long, str(runs / "tiny-long")).train(verbose=False)
    assert not os.path.exists(runs / "tiny-long")
    unfinished = Trainer(base, str(runs / "tiny"))  # a first phase stopped at step 0
    unfinished._open_run()
    unfinished.manager.save(checkpoint_number=0)
    with pytest.raises(ValueError, match=r"stopped at step 0 of 10; train it first.*resumes"):
        Trainer(long, str(runs / "tiny-long")).train(verbose=False)
    assert not os.path.exists(runs / "tiny-long")


def test_a_second_phase_of_another_model_is_refused_naming_the_model(tmp_path, monkeypatch):
    from gpicl_tf.train import Trainer

    base, long = two_phase_presets(monkeypatch, ["model.d_model=16"])
    Trainer(base, str(tmp_path / "runs" / "tiny")).train(verbose=False)
    with pytest.raises(ValueError, match=r"its model is another: .*d_model=32.*d_model=16"):
        Trainer(long, str(tmp_path / "runs" / "tiny-long")).train(verbose=False)
    assert not os.path.exists(tmp_path / "runs" / "tiny-long")


def test_the_throughput_benchmarks_step_only_path_trains_on_one_repeated_batch(
        tiny, tmp_path, monkeypatch):
    """benchmarks/train_throughput.py times gpicl_tf "step only" the way the PyTorch peer
    is timed: every step sees the stream's first batch."""
    monkeypatch.syspath_prepend(REPO)
    from benchmarks.train_throughput import one_batch_dataset_fn
    from gpicl_tf import data as data_lib
    from gpicl_tf.train import Trainer, run_steps

    fn = one_batch_dataset_fn(tiny)
    batches = list(fn(None, 0).take(3))
    first = next(iter(data_lib.make_dataset(tiny.task, tiny.train.seed,
                                            tiny.train.batch_size)))
    for b in batches:
        for k in ("x", "y", "is_query"):
            np.testing.assert_array_equal(b[k].numpy(), first[k].numpy())
    cached = Trainer(tiny, str(tmp_path / "a"), dataset_fn=fn)
    live = Trainer(tiny, str(tmp_path / "b"))
    a, b = run_steps(cached, 30), run_steps(live, 30)
    assert a[0] == b[0]  # the same first batch and initialisation
    assert a[-1] < 0.5 * a[0], a  # fitting one batch drives its loss down
    assert a[1:] != b[1:]


def test_run_steps_goes_on_with_a_kept_iterator_as_training_does(tiny, tmp_path, monkeypatch):
    """run_steps on one kept stream iterator (the throughput benchmark's timings: one
    iterator per run, as in training) trains on the tasks of one uninterrupted call
    sequence, call for call, and draws from the iterator it is given."""
    monkeypatch.syspath_prepend(REPO)
    from benchmarks.train_throughput import one_batch_dataset_fn
    from gpicl_tf.train import Trainer, run_steps, stream_iterator

    whole = run_steps(Trainer(tiny, str(tmp_path / "a")), 6)
    kept = Trainer(tiny, str(tmp_path / "b"))
    it = stream_iterator(kept)
    assert run_steps(kept, 2, 1, it) + run_steps(kept, 4, 1, it) == whole
    assert int(kept.step.numpy()) == 6
    one = Trainer(tiny, str(tmp_path / "c"), dataset_fn=one_batch_dataset_fn(tiny))
    other = Trainer(tiny, str(tmp_path / "d"))
    got = run_steps(other, 6, 1, stream_iterator(one))  # other's model, one's stream
    assert got == run_steps(Trainer(tiny, str(tmp_path / "e"),
                                    dataset_fn=one_batch_dataset_fn(tiny)), 6)
    assert got != whole


def test_run_steps_starts_a_bar_head_from_the_priors_borders_as_train_does(tiny, tmp_path):
    """The benchmarks' losses beside their speeds come from run_steps: a fresh trainer's
    first calls equal a fresh train()'s (the bar head's borders from the training prior,
    not the layer's initial ones: under those the `default`'s calls read 9-800 nats, with
    them 1.6-1.9 between rare calls of a tail query that is far out)."""
    from gpicl_tf.config import apply_overrides
    from gpicl_tf.train import Trainer, prior_borders, run_steps

    cfg = apply_overrides(tiny, ["model.head=bar", "model.n_bins=16", "train.steps=10",
                                 "train.steps_per_call=5", "train.log_every=5",
                                 "train.eval_every=10", "train.checkpoint_every=10"])
    result = Trainer(cfg, str(tmp_path / "a")).train(verbose=False)
    bench = Trainer(cfg, str(tmp_path / "b"))
    losses = run_steps(bench, 2, 5)
    np.testing.assert_array_equal(bench.model.get_layer("bar").borders.numpy(),
                                  np.asarray(prior_borders(cfg)))
    assert losses[-1] == pytest.approx(result.final_loss, abs=1e-6)
