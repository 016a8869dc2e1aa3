import dataclasses
import json
import os
import time

import numpy as np
import pytest

from gpicl_tf import evaluate as ev
from gpicl_tf.baselines import BASELINES
from gpicl_tf.config import apply_overrides, get_preset


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    import keras

    from gpicl_tf.config import get_preset
    from gpicl_tf.export import export_model
    from gpicl_tf.model import build_model

    cfg = get_preset("tiny")
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    base = str(tmp_path_factory.mktemp("ex"))
    export_model(model, cfg, base, "tiny")
    return os.path.join(base, "tiny"), cfg


@pytest.fixture(scope="module")
def results(tiny_export, tmp_path_factory):
    model_dir, cfg = tiny_export
    out = str(tmp_path_factory.mktemp("report"))
    logdir = str(tmp_path_factory.mktemp("tb"))
    code = ev.main(["--model", model_dir, "--out", out, "--ks", "1,8", "--tasks", "4",
                    "--baselines", ",".join(BASELINES), "--queries", "8", "--logdir", logdir])
    assert code == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), out, logdir, cfg


def test_every_suite_and_baseline_runs_with_the_documented_schema(results):
    res, out, _, cfg = results
    names = {s.name for s in ev.default_suites(cfg)}
    assert set(res["suites"]) == names
    for name, suite in res["suites"].items():
        assert {"family", "kind", "overrides", "methods"} <= set(suite)
        expected = {"model", *BASELINES} | ({"bayes_optimal"} if suite["family"] == "gp_rbf"
                                            else set())
        assert set(suite["methods"]) == expected, name
        for meth, row in suite["methods"].items():
            assert set(row) == {"1", "8"}
            for entry in row.values():
                assert set(entry) == {"mse", "ci95", "nmse", "nmse_ci95", "n_tasks",
                                      "sec_per_task"}
                lo, hi = entry["ci95"]
                assert lo <= entry["mse"] <= hi and np.isfinite(entry["mse"])
                lo, hi = entry["nmse_ci95"]
                assert lo <= entry["nmse"] <= hi and np.isfinite(entry["nmse"])
                assert entry["n_tasks"] == 4  # every method on the same tasks
    for f in ("results.md", "mse_vs_k.png", "fits_sine.png", "fits_linear.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0


def test_bayes_optimal_beats_every_baseline_on_gp_tasks(tiny_export):
    _, cfg = tiny_export
    suites = [s for s in ev.default_suites(cfg) if s.family == "gp_rbf"]
    res = ev.evaluate(lambda cx, cy, qx: np.zeros(qx.shape[:2] + (1,)), cfg, suites, ks=(8,),
                      baselines=tuple(BASELINES), n_tasks=32, progress=False)
    for name, suite in res["suites"].items():
        m = suite["methods"]
        opt = m["bayes_optimal"]["8"]["mse"]
        for b in BASELINES:
            assert opt < m[b]["8"]["mse"], (name, b, opt, m[b]["8"]["mse"])


def test_mean_predictor_on_a_constant_task_has_a_zero_width_ci():
    x = np.random.default_rng(0).uniform(-1, 1, (10, 12, 1))
    y = np.full((10, 12, 1), 3.5)
    errs = [np.mean((BASELINES["mean"](x[i, :4], y[i, :4], x[i, 4:]) - y[i, 4:]) ** 2)
            for i in range(10)]
    mse, ci = ev.mean_ci95(errs)
    assert mse == 0.0 and ci == [0.0, 0.0]
    _, ci_noisy = ev.mean_ci95([0.1, 0.3, 0.2])
    assert ci_noisy[1] - ci_noisy[0] > 0


def test_tensorboard_gets_the_scalars_and_images(results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, logdir, _ = results
    acc = EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "eval/sine/model" in tags and "eval/gp_rbf_l0.5/bayes_optimal" in tags
    assert "mse_vs_k" in tags


@pytest.mark.parametrize("args,message", [
    (["--suites", "sine,fourier"], "fourier"),
    (["--ks", "4,99"], "at most 15 context points"),
    (["--baselines", "mean,xgboost"], "xgboost"),
    (["--version", "7"], "--version 7 does not exist"),
    (["--n-permutations", "2"], "--n-permutations 2: expected 1 for a regression model"),
])
def test_bad_requests_fail_before_any_work(tiny_export, tmp_path, capsys, args, message):
    model_dir, _ = tiny_export
    out = str(tmp_path / "out")
    assert ev.main(["--model", model_dir, "--out", out, *args]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_version_folder_is_a_model_too_and_takes_no_version(tiny_export, tmp_path, capsys):
    """--model may name one version folder (a shipped model is one), as the estimator's
    model= may; a --version beside it is refused before any work."""
    model_dir, _ = tiny_export
    version_dir = os.path.join(model_dir, "1")
    out = str(tmp_path / "v")
    assert ev.main(["--model", version_dir, "--out", out, "--suites", "sine", "--ks", "2",
                    "--tasks", "3", "--baselines", "mean"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["suites"]["sine"]["methods"]["model"]["2"]["n_tasks"] == 3
    assert ev.main(["--model", version_dir, "--out", str(tmp_path / "w"), "--version", "1"]) == 2
    assert "--version 1: " in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


def test_unknown_family_suite_fails_before_any_work(tiny_export):
    _, cfg = tiny_export
    with pytest.raises(ValueError, match="unknown"):
        ev.evaluate(None, cfg, [ev.Suite("x", "fourier")], ks=(1,), progress=False)


def test_methods_are_paired_on_the_same_tasks_and_nmse_is_per_task(tiny_export):
    """A "model" that is GP regression scores exactly what the gp baseline scores."""
    from gpicl_tf.baselines import gp_regression

    _, cfg = tiny_export
    suites = [s for s in ev.default_suites(cfg) if s.name in ("sine", "random_mlp")]

    def gp_model(cx, cy, qx):
        return np.stack([gp_regression(cx[i], cy[i], qx[i]) for i in range(len(cx))])

    res = ev.evaluate(gp_model, cfg, suites, ks=(4,), baselines=("gp",), n_tasks=20,
                      n_queries=6, progress=False)
    for s in suites:
        m = res["suites"][s.name]["methods"]
        assert m["model"]["4"]["mse"] == pytest.approx(m["gp"]["4"]["mse"], rel=1e-6)
        x, y, _ = ev.context_batch(cfg, 4, 20, 6, ev.EVAL_SEED, family=s.family, **s.overrides)
        errs = np.mean((gp_model(x[:, :4], y[:, :4], x[:, 4:]) - y[:, 4:]) ** 2, axis=(1, 2))
        nmse = np.mean(errs / y.var(axis=1).mean(-1))
        assert m["gp"]["4"]["nmse"] == pytest.approx(nmse, rel=1e-5)


def test_baselines_fitted_by_worker_processes_score_exactly_what_one_process_scores(
        tiny_export):
    """evaluate(jobs=2) fits the per-task baselines in a pool of processes: every score is
    the same as with jobs=1; jobs=0 is refused."""
    _, cfg = tiny_export
    suites = [s for s in ev.default_suites(cfg) if s.name in ("sine", "gp_rbf_l0.5")]
    model = lambda cx, cy, qx: np.zeros((len(qx), qx.shape[1], 1))
    one, two = (ev.evaluate(model, cfg, suites, ks=(2, 8), baselines=("knn", "gp", "ridge"),
                            n_tasks=24, n_queries=6, progress=False, jobs=j) for j in (1, 2))
    for s in suites:
        a, b = one["suites"][s.name]["methods"], two["suites"][s.name]["methods"]
        assert list(a) == list(b) == ["model", "knn", "gp", "ridge"] + (  # in this order
            ["bayes_optimal"] if s.family == "gp_rbf" else [])
        for m in a:
            for k in ("2", "8"):
                assert a[m][k].pop("sec_per_task") > 0 and b[m][k].pop("sec_per_task") > 0
                assert a[m][k] == b[m][k], (s.name, m, k)
    with pytest.raises(ValueError, match="jobs=0: expected an integer >= 1"):
        ev.evaluate(model, cfg, suites, ks=(2,), baselines=("knn",), progress=False, jobs=0)


def test_the_pool_fits_a_cells_baselines_while_this_process_goes_on(tmp_path):
    """submit_tasks returns before its tasks are done (evaluate runs the model on the next
    cell meanwhile): each task waits for a file that this process writes only after
    submit_tasks has returned, and every task sees it. Without a pool the tasks run at
    once, in order."""
    from gpicl_tf.baselines import submit_tasks, task_pool

    flag = tmp_path / "went-on"

    def wait_for_flag(i):  # in a worker: up to 60 s
        deadline = time.time() + 60
        while not os.path.exists(str(flag)) and time.time() < deadline:
            time.sleep(0.01)
        return i, os.path.exists(str(flag))

    result = submit_tasks(wait_for_flag, [(i,) for i in range(6)], task_pool(2, ["knn"]))
    flag.write_text("")
    outs, sec = result()
    assert outs == [(i, True) for i in range(6)] and sec > 0
    flag.unlink()
    outs, _ = submit_tasks(lambda i: (i, os.path.exists(str(flag))), [(0,), (1,)])()
    assert outs == [(0, False), (1, False)]


def test_bad_numbers_are_one_line_errors(tiny_export, tmp_path, capsys):
    model_dir, _ = tiny_export
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit) as e:  # argparse's own error, exit 2
        ev.main(["--model", model_dir, "--out", out, "--tasks", "0"])
    assert e.value.code == 2
    assert "--tasks: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--model", model_dir, "--out", out, "--jobs", "0"])
    assert "--jobs: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--model", model_dir, "--out", out, "--task-points", "5000"])
    assert "--task-points: expected an integer >= 1 and <= 1024, got 5000" in (
        capsys.readouterr().err)
    assert ev.main(["--model", model_dir, "--out", out, "--ks", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "--ks 'a,b': expected comma-separated integers" in err and "Traceback" not in err
    assert not os.path.exists(out)


def test_out_that_is_a_file_and_a_junk_saved_model_fail_before_any_work(tiny_export, tmp_path,
                                                                         capsys):
    import shutil

    model_dir, _ = tiny_export
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert ev.main(["--model", model_dir, "--out", str(afile)]) == 2
    assert "--out" in capsys.readouterr().err and afile.read_text() == "x"
    junk = tmp_path / "junk"
    shutil.copytree(model_dir, junk)
    (junk / "1" / "saved_model.pb").write_bytes(b"not a protobuf")
    assert ev.main(["--model", str(junk), "--out", str(tmp_path / "o2"), "--suites", "sine"]) == 2
    err = capsys.readouterr().err
    assert "could not load it" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o2")


@pytest.mark.parametrize("name,ratio", [("lasso", 0.01), ("gp_ard", 0.05), ("gbt", 0.6),
                                        ("random_forest", 0.6)])
def test_the_tabular_baselines_learn_a_sparse_linear_task_in_3_features(name, ratio):
    """y = 2 x0 - x2 (x1 irrelevant): each baseline's error is far below the mean's."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 3))
    y = (2 * x[:, 0] - x[:, 2])[:, None]
    cx, cy, qx, qy = x[:32], y[:32], x[32:], y[32:]
    err = np.mean((BASELINES[name](cx, cy, qx) - qy) ** 2)
    mean_err = np.mean((BASELINES["mean"](cx, cy, qx) - qy) ** 2)
    assert err < ratio * mean_err, (name, err, mean_err)
    assert BASELINES[name](cx[:0], cy[:0], qx).shape == (32, 1)  # no context: zeros


def test_garg_suites_run_for_the_widths_the_model_reads_and_pad_for_the_model_only():
    from conftest import _tiny_model

    model, cfg = _tiny_model(["task.x_dim=8", "task.min_x_dim=2"])
    suites = [s for s in ev.default_suites(cfg) if s.kind == "garg"]
    assert len(suites) == 24  # 4 classes x d in {2, 4, 8} x noise-free and noisy
    narrow = ev.default_suites(apply_overrides(get_preset("tiny"), ["task.x_dim=4",
                                                                     "task.min_x_dim=4"]))
    assert {s.name for s in narrow if s.kind == "garg"} == {
        f"garg_{c}_d4{n}" for c in ev.GARG_COMPONENTS for n in ("", "_noisy")}
    widths = []
    keras_fn = ev.keras_predict_fn(model)

    def predict(cx, cy, qx):
        widths.append(cx.shape[-1])
        return keras_fn(cx, cy, qx)

    pick = [s for s in suites if s.name in ("garg_linear_d2", "garg_tree_d8_noisy")]
    res = ev.evaluate(predict, cfg, pick, ks=(4, 8), baselines=("mean", "ridge"), n_tasks=16,
                      progress=False)
    assert set(widths) == {8}  # the model always sees its trained width
    lin = res["suites"]["garg_linear_d2"]["methods"]
    assert lin["ridge"]["8"]["nmse"] < 1e-3  # ridge sees 2 features: a linear task is exact
    for suite in res["suites"].values():
        assert {m["8"]["n_tasks"] for m in suite["methods"].values()} == {16}


def test_a_wide_model_meets_the_same_1d_suites_and_its_prior_at_its_widths():
    from conftest import _tiny_model

    model, cfg = _tiny_model(["task.x_dim=8", "task.min_x_dim=1", "task.family=prior",
                              'task.mix=[["prior", 3], ["random_mlp", 1]]'])
    general = {s.name: s for s in ev.default_suites(get_preset("default"))}
    one_d = {s.name: s for s in ev.default_suites(get_preset("mlp1d"))}
    assert general["prior"].kind == "in-distribution" and "prior" not in one_d
    for name, s in one_d.items():  # the same tasks whatever the model's width
        assert general[name] == s
        x, _, _ = ev.context_batch(get_preset("default"), 4, 3, 5, 0, family=s.family,
                                   **s.overrides)
        ref, _, _ = ev.context_batch(get_preset("mlp1d"), 4, 3, 5, 0, family=s.family,
                                     **s.overrides)
        np.testing.assert_array_equal(x, ref)
        assert x.shape == (3, 9, 1)
    suites = {s.name: s for s in ev.default_suites(cfg)}
    widths = []
    keras_fn = ev.keras_predict_fn(model)
    res = ev.evaluate(lambda cx, cy, qx: widths.append(cx.shape[-1]) or keras_fn(cx, cy, qx),
                      cfg, [suites["prior"], suites["sine"]], ks=(8,), baselines=("mean",),
                      n_tasks=8, progress=False)
    assert set(widths) == {8} and set(res["suites"]) == {"prior", "sine"}


@pytest.mark.parametrize("dy", [1, 2])
def test_every_baseline_predicts_m_by_dy_and_linear_ones_are_exact_on_a_linear_task(dy):
    """A [m] answer to a [k, 1] target would broadcast against [m, 1] into an [m, m] error."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (40, 2))
    y = x @ rng.normal(size=(2, dy)) + 0.3
    for name, fn in BASELINES.items():
        out = np.asarray(fn(x[:24], y[:24], x[24:]))
        assert out.shape == (16, dy), (name, out.shape)
    for name in ("ridge", "poly_ridge", "lasso", "gp", "gp_ard"):
        err = np.mean((BASELINES[name](x[:24], y[:24], x[24:]) - y[24:]) ** 2)
        assert err < 1e-3 * y.var(), (name, err)


def test_the_garg_plot_has_a_panel_per_width_and_is_skipped_without_garg_suites(tmp_path):
    from conftest import _tiny_model

    model, cfg = _tiny_model(["task.x_dim=4", "task.min_x_dim=2"])
    pick = [s for s in ev.default_suites(cfg) if s.name in ("garg_linear_d2", "garg_tree_d4",
                                                            "garg_linear_d4_noisy")]
    res = ev.evaluate(ev.keras_predict_fn(model), cfg, pick, ks=(2, 4), baselines=("mean",),
                      n_tasks=4, progress=False)
    path = str(tmp_path / "g.png")
    assert ev.plot_garg_by_width(res, path) and os.path.getsize(path) > 5000
    res["suites"] = {n: s for n, s in res["suites"].items() if not n.startswith("garg")}
    assert not ev.plot_garg_by_width(res, str(tmp_path / "none.png"))
    assert not os.path.exists(tmp_path / "none.png")


def test_task_points_draws_the_tasks_training_draws_and_keeps_their_first_queries():
    """context_batch(task_points=64) draws each task with 64 points, as a 64-point preset's
    training does (`default` draws 48), and keeps its k context points and first queries: a
    random-MLP task's y are then standardised over all 64 (the kept 10 points' variance
    varies around 1), where without it they are standardised over the 10 points themselves
    (variance 1 each)."""
    from gpicl_tf import data as data_lib
    from gpicl_tf.config import unseen_task_config

    cfg = get_preset("default")
    s = [s for s in ev.default_suites(cfg) if s.name == "random_mlp"][0]
    x0, y0, q0 = ev.context_batch(cfg, 4, 64, 6, 7, family=s.family, **s.overrides)
    x1, y1, q1 = ev.context_batch(cfg, 4, 64, 6, 7, family=s.family, task_points=64,
                                  **s.overrides)
    assert x1.shape == x0.shape == (64, 10, 1) and y1.shape == (64, 10, 1)
    assert np.all(q1[:, :4] == 0) and np.all(q1[:, 4:] == 1)
    np.testing.assert_allclose(y0.var(axis=1), 1.0, atol=1e-3)
    v = y1.var(axis=1)[:, 0]
    assert v.std() > 0.2 and 0.7 < v.mean() < 1.2
    task = dataclasses.replace(unseen_task_config(cfg.task), n_points=64, min_context=0,
                               max_context=None, family=s.family, mix=(), **s.overrides)
    b = data_lib.sample_batch(task, 7, 64, n_context=4, stream=ev.REPORT_STREAM)
    order = np.argsort(b["is_query"].numpy(), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(np.take_along_axis(b["y"].numpy(), order[..., None], 1), y1)
    # fewer points than k + queries: the suites' own tasks
    x2, y2, _ = ev.context_batch(cfg, 4, 64, 6, 7, family=s.family, task_points=5,
                                 **s.overrides)
    np.testing.assert_array_equal(y2, y0)


def test_gpicl_eval_task_points_is_recorded_and_scores_those_tasks(tiny_export, tmp_path):
    model_dir, cfg = tiny_export
    out = str(tmp_path / "tp")
    assert ev.main(["--model", model_dir, "--out", out, "--suites", "random_mlp", "--ks", "2",
                    "--tasks", "5", "--queries", "4", "--baselines", "mean",
                    "--task-points", "40"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["task_points"] == 40
    s = [s for s in ev.default_suites(cfg) if s.name == "random_mlp"][0]
    _, y, _ = ev.context_batch(cfg, 2, 5, 4, ev.EVAL_SEED, family=s.family, task_points=40,
                               **s.overrides)
    nmse = np.mean(np.mean((y[:, 2:] - y[:, :2].mean(1, keepdims=True)) ** 2, axis=(1, 2))
                   / y.var(axis=1).mean(-1))
    assert res["suites"]["random_mlp"]["methods"]["mean"]["2"]["nmse"] == pytest.approx(nmse,
                                                                                       rel=1e-5)
