import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from gpicl_tf import data as data_lib
from gpicl_tf import datasets
from gpicl_tf import tasks
from gpicl_tf.config import apply_overrides
from gpicl_tf.experiments import runner
from gpicl_tf.experiments.presets import base_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_cfg(data_dir):
    return base_config("digits", "tiny", data_dir)


def test_digits_builder_prepares_offline_and_loads_with_tfds_load(data_dir):
    import tensorflow_datasets as tfds

    x, y = datasets.load_base("digits", data_dir, "train")
    assert x.shape == (1500, 64) and set(np.unique(y)) == set(range(10))
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
    test = tfds.load("sklearn_digits", data_dir=data_dir, split="test", as_supervised=True)
    assert sum(1 for _ in test) == 297


def test_unprepared_dataset_says_how_to_prepare_it_without_writing(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)'mnist' is not prepared.*prepare\('mnist'"):
        datasets.load_base("mnist", str(tmp_path), "train")
    assert not any("mnist" in p for p in os.listdir(tmp_path))
    with pytest.raises(ValueError, match="task.dataset='imagenet' is unknown"):
        datasets.load_base("imagenet", str(tmp_path))


def test_projection_and_permutation_statistics(digits_cfg):
    fam = tasks.get_family("projected_labels")(digits_cfg.task)
    proj, perm = fam.sample_function(tf.constant([0, 1], tf.int64), 200)
    d = fam.d_in
    np.testing.assert_allclose(np.std(proj.numpy()), 1 / math.sqrt(d), rtol=0.03)
    np.testing.assert_allclose(np.mean(proj.numpy()), 0, atol=0.01)
    p = perm.numpy()
    assert (np.sort(p, axis=1) == np.arange(10)).all()  # every permutation a bijection
    assert len({tuple(r) for r in p}) == 200


def test_classification_pool_has_exactly_T_tasks(digits_cfg):
    cfg = dataclasses.replace(digits_cfg.task, n_tasks=3)
    it = iter(data_lib.make_dataset(cfg, 0, 32, with_task_id=True))
    ids = set()
    for _ in range(4):
        b = next(it)
        ids.update(b["task_id"].numpy().tolist())
        y = b["y"].numpy()
        assert np.allclose(y.sum(-1), 1)  # one-hot labels
    assert ids == {0, 1, 2}
    fam = tasks.get_family("projected_labels")(cfg)
    pool = tf.constant([0, data_lib.POOL], tf.int64)
    perms = [tuple(fam.params_from_seeds([data_lib.fold(pool, i)])[1].numpy()[0])
             for i in range(3)]
    assert len(set(perms)) == 3


def test_biased_fraction_gives_a_fixed_task_to_part_of_every_block(tiny):
    cfg = dataclasses.replace(tiny.task, biased_fraction=0.25, block_size=8)
    b = next(iter(data_lib.make_dataset(cfg, 0, 32, with_task_id=True)))
    ids = b["task_id"].numpy().reshape(4, 8)
    assert (ids[:, :2] == -2).all() and (ids[:, 2:] == -1).all()
    # Fixed-task examples are one function: same x -> same y. Re-evaluate on a grid.
    fam = tasks.get_family("random_mlp")(cfg)
    grid = tf.constant(np.linspace(-1, 1, 9, dtype=np.float32)[None, :, None])
    y1 = fam.sample_y_from_seeds([tf.constant([0, data_lib.BIAS], tf.int64)], grid)
    x = b["x"].numpy()[:2]
    yf = fam.sample_y_from_seeds([tf.constant([0, data_lib.BIAS], tf.int64)] * 2,
                                 tf.constant(x)).numpy()
    yf = (yf - yf.mean(1, keepdims=True)) / yf.std(1, keepdims=True)
    np.testing.assert_allclose(yf, b["y"].numpy()[:2], atol=1e-4)
    assert y1.shape == (1, 9, 1)


def test_n_tasks_spec_parsing():
    assert runner.parse_n_tasks("2^0..2^4:2") == [1, 4, 16, None]
    assert runner.parse_n_tasks("1,8,none") == [1, 8, None]
    with pytest.raises(ValueError, match="expected 2\\^a..2\\^b"):
        runner.parse_n_tasks("1..16")


def test_two_setting_sweep_writes_outputs_and_rerun_skips_finished(tmp_path, digits_cfg,
                                                                    monkeypatch):
    out = str(tmp_path / "sweep")
    settings = [("tasks_2", ["task.n_tasks=2"]), ("tasks_inf", ["task.n_tasks=none"])]
    doc = runner.run("phase-transition", digits_cfg, settings, out, verbose=False)
    for f in ("results.json", "results.md", "phase-transition.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved["settings"]) == {"tasks_2", "tasks_inf"}
    m = saved["settings"]["tasks_2"]["metrics"]
    assert {"seen_loss", "unseen_loss", "seen_accuracy", "unseen_accuracy"} <= set(m)
    assert 0 <= m["unseen_accuracy"] <= 1
    assert saved["settings"]["tasks_2"]["plateau_level"] == pytest.approx(math.log(10))
    assert len(saved["settings"]["tasks_2"]["loss_curve"]) == 6
    assert doc["summary"]["unlimited_unseen_loss"] > 0

    import gpicl_tf.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("a finished setting was trained again")

    monkeypatch.setattr(train_mod.Trainer, "train", no_training)
    again = runner.run("phase-transition", digits_cfg, settings, out, verbose=False)
    assert again["settings"]["tasks_2"]["metrics"] == m


def test_hparams_view_sees_every_setting(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = base_config("random_mlp", "tiny")
    out = str(tmp_path / "s")
    runner.run("batch-size", cfg, [("batch_16", ["train.batch_size=16"])], out, verbose=False)
    acc = EventAccumulator(os.path.join(out, "runs", "batch_16"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "_hparams_/session_start_info" in tags and "final/unseen_loss" in tags


def test_every_experiment_builds_valid_settings():
    import argparse

    base = base_config("digits", "tiny")
    args = argparse.Namespace(n_tasks="2^0..2^4:2", batch_sizes="16,32", fractions="0,0.25",
                              sizes="32x1,64x2")
    for exp in runner.EXPERIMENTS:
        for name, overrides in runner.settings(exp, args):
            cfg = apply_overrides(base, overrides + [f"name={name}"])
            assert cfg.name == name
    assert [n for n, _ in runner.settings("biased-tasks", args)] == ["biased_0pct", "biased_25pct"]


def test_bad_experiment_arguments_fail_early(capsys):
    assert runner.main(["model-size", "--sizes", "64by2", "--preset", "tiny"]) == 2
    assert "expected D_MODELxLAYERS" in capsys.readouterr().err
