"""In-context classification for users (issue 6/7): the synthetic class prior, the
classification export, InContextClassifier and the offline transfer evaluation."""

import dataclasses
import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import NO_GPICL_TF, run_python
from gpicl_tf import InContextClassifier
from gpicl_tf.config import apply_overrides, get_preset

TINY = ["task.n_points=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.mlp_ratio=2"]


def _classifier(tmp_path_factory, overrides=(), name="cls"):
    """An untrained tiny classifier with a random (non-trivial) output head, exported."""
    from gpicl_tf.export import export_model
    from gpicl_tf.model import build_model

    cfg = apply_overrides(get_preset("classify"), TINY + list(overrides))
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    for w in model.get_layer("y_pred").weights:
        w.assign(tf.random.normal(w.shape, seed=3))
    base = str(tmp_path_factory.mktemp(name))
    return model, cfg, export_model(model, cfg, base, "gpicl-classify")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return _classifier(tmp_path_factory)


def _iris(n=30, seed=0):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(X))
    return X[idx[:n]], y[idx[:n]], X[idx[n:n + 20]]


# ------------------------------------------------------------------ the tasks
def test_class_prior_draws_class_counts_widths_and_random_ids():
    from gpicl_tf import data as data_lib

    task = dataclasses.replace(get_preset("classify").task, mix=(), n_points=96)
    b = data_lib.sample_batch(task, 0, 512, stream=77)
    x, y = b["x"].numpy(), b["y"].numpy()
    assert y.shape == (512, 96, 10) and np.all(y.sum(-1) == 1)
    n_cls = (y.sum(1) > 0).sum(-1)
    assert n_cls.min() == 2 and n_cls.max() == 10  # c ~ U[2, 10], all seen in 96 points
    assert 4.5 < n_cls.mean() < 7.0
    used = y.sum(1) > 0  # (T, C): which ids a task uses, a random subset
    assert np.all(np.abs(used.mean(0) - used.mean()) < 0.08)
    width = (np.abs(x).sum(1) > 0).sum(-1)
    assert width.min() == 1 and width.max() == 16


def test_projected_digits_with_fewer_classes_keep_unseen_images_out(tmp_path):
    from gpicl_tf import data as data_lib

    task = dataclasses.replace(get_preset("classify").task, family="projected_labels", mix=(),
                               data_dir=str(tmp_path), n_points=64)
    b = data_lib.sample_batch(task, 0, 128, stream=5)
    y = b["y"].numpy()
    n_cls = (y.sum(1) > 0).sum(-1)
    assert n_cls.min() >= 2 and n_cls.max() == 10 and n_cls.min() < 5
    # classes of a task are about equally frequent
    counts = y.sum(1)
    big = counts[n_cls == 2]
    assert np.all(np.abs(big[big > 0] - 32) < 20)


# ------------------------------------------------------------------ the export
def test_probabilities_sum_to_one_and_classes_absent_from_the_context_get_zero(classifier):
    _, cfg, path = classifier
    sig = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(0)
    cx = rng.normal(size=(2, 12, 5)).astype("float32")
    ids = np.array([[0, 2, 7] * 4, [1, 1, 3] * 4], np.int64)
    p = sig(context_x=cx, context_y=ids, query_x=rng.normal(size=(2, 6, 5)).astype("float32")
            )["probabilities"].numpy()
    assert p.shape == (2, 6, 10)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert np.all(p[0][:, [1, 3, 4, 5, 6, 8, 9]] == 0) and np.all(p[0][:, [0, 2, 7]] > 0)
    assert np.all(p[1][:, [0, 2, 4, 5, 6, 7, 8, 9]] == 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"context_y: expected class ids "
                                                             r"in \[0, 10\)"):
        sig(context_x=cx, context_y=ids + 5, query_x=cx[:, :2])


def test_a_classifier_export_served_without_gpicl_tf_gives_the_keras_probabilities(
        classifier, tmp_path):
    from gpicl_tf import evaluate_classification as ec

    model, cfg, path = classifier
    rng = np.random.default_rng(1)
    cx, qx = rng.normal(size=(9, 16)), rng.normal(size=(5, 16))
    cy = np.array([0, 1, 2] * 3)
    np.savez(tmp_path / "req.npz", cx=cx[None].astype("float32"), cy=cy[None], qx=qx[None]
             .astype("float32"))
    code = NO_GPICL_TF + f"""
import json
import numpy as np, tensorflow as tf
r = np.load({str(tmp_path / 'req.npz')!r})
f = tf.saved_model.load({path!r}).signatures["serving_default"]
out = f(context_x=tf.constant(r["cx"]), context_y=tf.constant(r["cy"]), query_x=tf.constant(r["qx"]))
print("RESULT", json.dumps({{"keys": sorted(out), "p": out["probabilities"].numpy().tolist()}}))
"""
    res = json.loads(run_python(code, cwd=str(tmp_path), env={"PYTHONPATH": ""}).stdout
                     .split("RESULT", 1)[1])
    assert res["keys"] == ["probabilities"]
    keras_p = ec.keras_classify_fn(model, cfg)(cx[None], cy[None], qx[None])[0]
    np.testing.assert_allclose(np.array(res["p"])[0], keras_p, rtol=1e-4, atol=1e-6)
    cfg_json = json.loads(tf.saved_model.load(path).signatures["model_config"](
        unused=tf.zeros([1]))["config_json"].numpy())
    assert cfg_json["task"]["family"] == "class_prior" and cfg_json["task"]["y_dim"] == 10


# --------------------------------------------------------------- the estimator
def test_gpicl_eval_refuses_task_points_for_a_classifier(classifier, tmp_path, capsys):
    from gpicl_tf.cli import eval_main

    out = str(tmp_path / "o")
    assert eval_main(["--model", classifier[2], "--out", out, "--task-points", "64"]) == 2
    assert "--task-points 64: for regression models" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_predict_proba_rows_sum_to_one_and_string_labels_round_trip(classifier):
    X, y, Xq = _iris()
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    clf = InContextClassifier(classifier[2]).fit(X, names)
    p = clf.predict_proba(Xq)
    assert p.shape == (20, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)
    assert list(clf.classes_) == ["setosa", "versicolor", "virginica"]
    pred = clf.predict(Xq)
    assert pred.dtype.kind == "U" and set(pred) <= set(names)
    np.testing.assert_array_equal(pred, clf.classes_[p.argmax(1)])
    assert clf.score(Xq, pred) == 1.0


def test_relabelling_the_classes_permutes_the_probabilities(classifier):
    X, y, Xq = _iris(seed=2)
    a = InContextClassifier(classifier[2]).fit(X, y)
    relabel = np.array([7, 3, 5])  # 0 -> 7, 1 -> 3, 2 -> 5: the sorted order changes
    b = InContextClassifier(classifier[2]).fit(X, relabel[y])
    pa, pb = a.predict_proba(Xq), b.predict_proba(Xq)
    cols = [list(b.classes_).index(c) for c in relabel]  # b's column of each of a's classes
    np.testing.assert_allclose(pb[:, cols], pa, rtol=1e-6, atol=1e-7)
    assert not np.allclose(pa[:, 0], pa[:, 1])  # the probabilities do differ by class
    perm = np.random.default_rng(0).permutation(len(X))  # the rows' order matters neither
    c = InContextClassifier(classifier[2]).fit(X[perm], y[perm])
    np.testing.assert_allclose(c.predict_proba(Xq), pa, rtol=1e-4, atol=1e-6)


def test_too_many_classes_or_features_are_refused_naming_them(classifier):
    X = np.random.default_rng(0).normal(size=(40, 3))
    with pytest.raises(ValueError, match=r"y has 11 classes, but the model .* tells at most "
                                         r"10 apart \(task.y_dim\)"):
        InContextClassifier(classifier[2]).fit(X[:33], np.arange(33) % 11)
    with pytest.raises(ValueError, match="X has 17 features, but the model .* expects from 1 "
                                         "to 16"):
        InContextClassifier(classifier[2]).fit(np.zeros((6, 17)), [0, 1] * 3)
    with pytest.raises(ValueError, match="is a classification model: expected a regression "
                                         "model here; use InContextClassifier"):
        from gpicl_tf import InContextRegressor

        InContextRegressor(classifier[2]).fit(X, X[:, 0])


def test_more_points_than_the_context_holds_average_subsets(classifier):
    X, y, Xq = _iris(n=100)
    clf = InContextClassifier(classifier[2], max_context=20, n_subsets=3).fit(X, y)
    p = clf.predict_proba(Xq)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)
    rng = np.random.default_rng(0)  # the subsets random_state=0 draws
    subsets = [rng.choice(100, 20, replace=False) for _ in range(3)]
    xs = (Xq - clf._x_loc) / clf._x_scale
    raw = np.mean([clf._backend().classify(clf._cx[s][None], clf._ids[s][None], xs[None])[0]
                   for s in subsets], 0)  # the mixture of the subsets' predictions
    ref = np.zeros((20, 3))
    ref[:, clf._class_of_id] = raw[:, :3]
    np.testing.assert_allclose(p, ref / ref.sum(1, keepdims=True), rtol=1e-9)


def test_an_ensemble_averages_members_with_permuted_columns_and_class_ids(classifier):
    X, y, Xq = _iris(seed=3)
    one = InContextClassifier(classifier[2]).fit(X, y)
    ens = InContextClassifier(classifier[2], n_permutations=4, random_state=5).fit(X, y)
    p = ens.predict_proba(Xq)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)
    # By hand, member by member, one call each: the member's columns in its order, class
    # id i given to the model as ids_map[i], so id i's probability is column ids_map[i].
    rng = np.random.default_rng(5)
    maps = [(np.arange(4), np.arange(10))] + [(rng.permutation(4), rng.permutation(10))
                                              for _ in range(3)]
    xs = (Xq - ens._x_loc) / ens._x_scale
    raw = np.zeros((20, 10))
    for order, ids_map in maps:
        q = ens._backend().classify(ens._cx[:, order][None], ids_map[ens._ids][None],
                                    xs[:, order][None])[0]
        raw += np.stack([q[:, ids_map[i]] for i in range(10)], 1) / 4
    ref = np.zeros((20, 3))
    ref[:, ens._class_of_id] = raw[:, :3]
    np.testing.assert_allclose(p, ref / ref.sum(1, keepdims=True), rtol=1e-6, atol=1e-9)
    assert np.abs(p - one.predict_proba(Xq)).max() > 1e-3  # the members differ
    np.testing.assert_array_equal(  # one member is the single model, exactly
        InContextClassifier(classifier[2], n_permutations=1).fit(X, y).predict_proba(Xq),
        one.predict_proba(Xq))
    relabel = np.array([7, 3, 5])  # renaming the classes still permutes the columns only
    b = InContextClassifier(classifier[2], n_permutations=4, random_state=5).fit(
        X, relabel[y])
    cols = [list(b.classes_).index(c) for c in relabel]
    np.testing.assert_allclose(b.predict_proba(Xq)[:, cols], p, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"n_permutations=0: expected an integer >= 1"):
        InContextClassifier(classifier[2], n_permutations=0).fit(X, y)


def test_serving_url_backend_gives_the_export_probabilities(classifier):
    from fake_serving import FakeServing

    X, y, Xq = _iris()
    local = InContextClassifier(classifier[2]).fit(X, y).predict_proba(Xq)
    with FakeServing(name="gpicl-classify", versions={1: classifier[2]}) as srv:
        remote = InContextClassifier(f"{srv.url}/v1/models/gpicl-classify").fit(X, y)
        np.testing.assert_allclose(remote.predict_proba(Xq), local, rtol=1e-5, atol=1e-6)
        # an ensemble's members travel as one request of batch 3, and come back the same
        ens = dict(n_permutations=3, random_state=4)
        np.testing.assert_allclose(
            InContextClassifier(f"{srv.url}/v1/models/gpicl-classify", **ens).fit(X, y)
            .predict_proba(Xq),
            InContextClassifier(classifier[2], **ens).fit(X, y).predict_proba(Xq),
            rtol=1e-5, atol=1e-6)


CLASSIFIER_WAIVERS = {
    "check_fit2d_1sample": "a single context point is valid context; we accept it",
    "check_fit1d": "1-D X is accepted as one feature (documented)",
    "check_classifiers_train": "asserts accuracy > 0.83 on its data; the test model is "
                               "untrained",
    "check_classifiers_classes": "asserts the training labels come back on its data; the "
                                 "test model is untrained",
    # float32 arithmetic, as for the regressor: ~3e-7 relative against rtol 1e-7
    "check_methods_subset_invariance": "float32 rounding (~3e-7 relative)",
    "check_methods_sample_order_invariance": "float32 rounding (~3e-7 relative)",
}


def test_scikit_learn_estimator_checks(tmp_path_factory):
    from sklearn.utils.estimator_checks import check_estimator

    _, _, path = _classifier(tmp_path_factory, ["task.x_dim=10"], "cls10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(InContextClassifier(path), on_fail=None,
                                  expected_failed_checks=CLASSIFIER_WAIVERS)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    assert not failed, failed
    assert sum(r["status"] == "passed" for r in results) >= 30


# ------------------------------------------------------- the transfer evaluation
def test_transfer_evaluation_scores_every_method_on_the_same_tasks(classifier, tmp_path):
    from gpicl_tf import evaluate_classification as ec

    model, cfg, path = classifier
    tasks = ec.make_tasks(*ec.load_dataset("breast_cancer"), 16, 10, 3, 8, 4, seed=1)
    assert all(cx.shape == (6, 16) and qx.shape == (8, 16) for cx, _, qx, _ in tasks)
    assert all(sorted(cy) == [0, 0, 0, 1, 1, 1] for _, cy, _, _ in tasks)
    res = ec.evaluate(ec.saved_model_classify_fn(path), cfg, ["iris", "wine"], (1, 5, 20),
                      ("sgd", "knn"), n_tasks=3, n_queries=8, progress=False)
    for name in ("iris", "wine"):
        d = res["datasets"][name]
        assert d["n_classes"] == 3 and set(d["methods"]) == {"model", "sgd", "knn"}
        assert set(d["methods"]["model"]) == {"1", "5"} and "20" in d["skipped"]
        for cells in d["methods"].values():
            assert all(0 <= c["accuracy"] <= 1 and c["n_tasks"] == 3 for c in cells.values())
    md = ec.markdown(res)
    assert "### accuracy, k = 5 per class" in md and "| sgd |" in md and "Skipped: iris k=20" in md
    ec.plot(res, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 5000
    again = ec.evaluate(ec.saved_model_classify_fn(path), cfg, ["iris"], (1,), ("sgd",),
                        n_tasks=3, n_queries=8, progress=False, n_permutations=3)
    iris = again["datasets"]["iris"]["methods"]
    assert set(iris) == {"model", "model_x3", "sgd"} and iris["model_x3"]["1"]["n_tasks"] == 3
    for m in ("model", "sgd"):  # seeded: the same tasks and numbers again, ensemble or not
        for metric in ("accuracy", "log_loss"):
            assert iris[m]["1"][metric] == res["datasets"]["iris"]["methods"][m]["1"][metric]
    assert iris["model_x3"]["1"]["log_loss"] != iris["model"]["1"]["log_loss"]
    with pytest.raises(ValueError, match=r"--n-permutations 0: expected an integer >= 1"):
        ec.evaluate(ec.saved_model_classify_fn(path), cfg, ["iris"], (1,), (), n_tasks=1,
                    progress=False, n_permutations=0)


def test_the_classify_main_job_trains_exports_and_reports(tmp_path):
    """python train_keras.py --preset classify, shrunk: a classification export and the
    short transfer report (offline datasets against SGD, logistic regression, k-NN)."""
    import os

    from conftest import REPO

    sets = [x for kv in TINY for x in ("--set", kv)]
    out = run_python([os.path.join(REPO, "train_keras.py"), "--preset", "classify", "--steps",
                      "10", "--batch-size", "16", *sets, "--set",
                      f"task.data_dir={tmp_path / 'tfds'}"], cwd=str(tmp_path), timeout=900)
    assert os.listdir(tmp_path / "exports" / "gpicl-classify") == ["1"]
    md = (tmp_path / "reports" / "gpicl-classify" / "results.md").read_text()
    for name in ("iris", "wine", "breast_cancer", "digits_test"):
        assert name in md
    assert "### accuracy, k = 10 per class" in md and "| sgd |" in md
    assert "report: reports/gpicl-classify/results.md" in out.stdout
    res = json.loads((tmp_path / "reports" / "gpicl-classify" / "results.json").read_text())
    assert res["datasets"]["digits_test"]["skipped"]["10"].startswith("10 x 10 classes")
