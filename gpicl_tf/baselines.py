"""Classical learners fitted to each task's context points (scikit-learn).

Each baseline is a function `predict(x_ctx [k, dx], y_ctx [k, dy], x_query [m, dx])
-> [m, dy]`, looked up by name in `BASELINES`. With no context every baseline
predicts 0 (the prior mean of standardised tasks).
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import Lasso, LassoCV, Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler


def _empty(x_query, dy):
    return np.zeros((len(x_query), dy), np.float32)


def context_mean(x_ctx, y_ctx, x_query):
    """Predicts the mean of the context targets."""
    if len(x_ctx) == 0:
        return _empty(x_query, y_ctx.shape[1])
    return np.repeat(y_ctx.mean(0, keepdims=True), len(x_query), axis=0)


def knn(x_ctx, y_ctx, x_query):
    """k-nearest neighbours, k chosen per task by leave-one-out squared error."""
    k_ctx = len(x_ctx)
    if k_ctx == 0:
        return _empty(x_query, y_ctx.shape[1])
    if k_ctx <= 2:
        best = 1
    else:
        d = np.sum((x_ctx[:, None, :] - x_ctx[None, :, :]) ** 2, -1)  # (k, k)
        np.fill_diagonal(d, np.inf)
        order = np.argsort(d, axis=1)[:, :-1]  # neighbours of each point, self excluded
        errs = [np.mean((y_ctx[order[:, :k]].mean(1) - y_ctx) ** 2)
                for k in range(1, k_ctx)]
        best = int(np.argmin(errs)) + 1
    return KNeighborsRegressor(n_neighbors=best).fit(x_ctx, y_ctx).predict(x_query)


def ridge(x_ctx, y_ctx, x_query, alpha: float = 1e-3):
    """Ridge regression on x."""
    if len(x_ctx) == 0:
        return _empty(x_query, y_ctx.shape[1])
    # scikit-learn's linear models return [m] for a [k, 1] target: keep [m, dy]
    return Ridge(alpha=alpha).fit(x_ctx, y_ctx).predict(x_query).reshape(len(x_query), -1)


def poly_ridge(x_ctx, y_ctx, x_query, degree: int = 3, alpha: float = 1e-2):
    """Ridge regression on polynomial features of degree 3."""
    if len(x_ctx) == 0:
        return _empty(x_query, y_ctx.shape[1])
    model = make_pipeline(PolynomialFeatures(degree), StandardScaler(), Ridge(alpha=alpha))
    return model.fit(x_ctx, y_ctx).predict(x_query).reshape(len(x_query), -1)


def _gp(x_ctx, y_ctx, x_query, length_scale, return_std=False):
    """GP regression, constant x RBF(length_scale) + noise kernel, hyperparameters by
    maximum likelihood. With return_std, also the predictive std of a noisy observation
    (the fitted noise included) [m, dy]: a Gaussian predictive distribution."""
    if len(x_ctx) == 0:
        empty = _empty(x_query, y_ctx.shape[1])
        return (empty, np.ones_like(empty)) if return_std else empty
    kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(length_scale, (1e-2, 1e2))
              + WhiteKernel(1e-3, (1e-6, 1e0)))
    gp = GaussianProcessRegressor(kernel, normalize_y=len(x_ctx) > 1, n_restarts_optimizer=0,
                                  random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(x_ctx, y_ctx)
        if not return_std:
            return gp.predict(x_query).reshape(len(x_query), -1)
        mean, std = gp.predict(x_query, return_std=True)  # WhiteKernel: noise included
    mean = mean.reshape(len(x_query), -1)
    std = np.broadcast_to(std.reshape(len(x_query), -1), mean.shape)
    return mean, np.maximum(std, 1e-9)


def gp_regression(x_ctx, y_ctx, x_query):
    """GP regression, RBF + noise kernel, hyperparameters by maximum likelihood."""
    return _gp(x_ctx, y_ctx, x_query, 0.3)


def gp_regression_dist(x_ctx, y_ctx, x_query):
    """gp_regression's Gaussian predictive distribution: (mean, std), each [m, dy]."""
    return _gp(x_ctx, y_ctx, x_query, 0.3, return_std=True)


def gp_ard_dist(x_ctx, y_ctx, x_query):
    """gp_ard's Gaussian predictive distribution: (mean, std), each [m, dy]."""
    return _gp(x_ctx, y_ctx, x_query, np.full(x_ctx.shape[1], 0.5), return_std=True)


def lasso(x_ctx, y_ctx, x_query):
    """Lasso, its penalty chosen per task by cross-validation (up to 5 folds; a fixed small
    penalty below 4 points), one model per output."""
    k = len(x_ctx)
    return _per_output(lambda: (LassoCV(cv=min(5, k), max_iter=5000) if k >= 4
                                else Lasso(alpha=1e-3, max_iter=5000)), x_ctx, y_ctx, x_query)


def gp_ard(x_ctx, y_ctx, x_query):
    """GP regression with one RBF length scale per input feature (ARD) + noise, by maximum
    likelihood."""
    return _gp(x_ctx, y_ctx, x_query, np.full(x_ctx.shape[1], 0.5))


def _per_output(make, x_ctx, y_ctx, x_query):
    """One fresh scikit-learn model (`make()`) per output column: [m, dy]."""
    if len(x_ctx) == 0:
        return _empty(x_query, y_ctx.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.stack([make().fit(x_ctx, y_ctx[:, j]).predict(x_query)
                         for j in range(y_ctx.shape[1])], 1)


def gbt(x_ctx, y_ctx, x_query):
    """Gradient-boosted trees (scikit-learn's GradientBoostingRegressor: 100 trees of depth 3,
    learning rate 0.1, leaves of at least 1 point)."""
    return _per_output(lambda: GradientBoostingRegressor(random_state=0), x_ctx, y_ctx,
                       x_query)


def random_forest(x_ctx, y_ctx, x_query):
    """A random forest of 100 trees (scikit-learn defaults)."""
    return _per_output(lambda: RandomForestRegressor(n_estimators=100, random_state=0),
                       x_ctx, y_ctx, x_query)


def mlp(x_ctx, y_ctx, x_query, steps: int = 300):
    """A small MLP (2 x 32, tanh) trained per task by Adam for a fixed budget."""
    if len(x_ctx) == 0:
        return _empty(x_query, y_ctx.shape[1])
    net = MLPRegressor(hidden_layer_sizes=(32, 32), activation="tanh", solver="adam", learning_rate_init=1e-2,
                       max_iter=steps, tol=0.0, n_iter_no_change=steps, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        net.fit(x_ctx, y_ctx if y_ctx.shape[1] > 1 else y_ctx[:, 0])
    return net.predict(x_query).reshape(len(x_query), -1)


BASELINES = {
    "mean": context_mean,
    "knn": knn,
    "ridge": ridge,
    "poly_ridge": poly_ridge,
    "gp": gp_regression,
    "gp_ard": gp_ard,
    "lasso": lasso,
    "gbt": gbt,
    "random_forest": random_forest,
    "mlp": mlp,
}


# Baselines with a predictive distribution (Gaussian): name -> fn returning (mean, std).
DISTRIBUTIONS = {"gp": gp_regression_dist, "gp_ard": gp_ard_dist}


def get_baseline(name: str):
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r} is unknown: expected one of {sorted(BASELINES)}")
    return BASELINES[name]


def _timed_call(fn, args):
    """fn(*args) and the seconds it took (in whichever process runs it)."""
    tic = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - tic


def task_pool(jobs: int, baselines):
    """A pool of `jobs` worker processes (joblib's loky backend, scikit-learn's own
    dependency) that fits the per-task baselines, or None to fit them here, one after
    the other (jobs 1, or no baselines). Each fit is a pure function of its task, so
    the results do not depend on the number of workers; on 2 cores, 2 workers take
    about half the time once they have started (about a second: this module imports no
    TensorFlow). The pool is a factory of joblib.Parallel calls that return at once
    (`submit_tasks`); they all share loky's one set of workers."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs!r}: expected an integer >= 1")
    if jobs == 1 or not baselines:
        return None
    import joblib

    return functools.partial(joblib.Parallel, n_jobs=jobs, backend="loky",
                             return_as="generator")


def submit_tasks(fn, tasks: list, pool=None):
    """Starts [fn(*task) for task in tasks] in the pool's workers and returns at once a
    function that waits for them and returns (outputs, the mean seconds per task of the
    calls themselves, not the wall time of the pool). Meanwhile this process can go on:
    gpicl-eval runs the model on the next cell while the workers fit this one's
    baselines. Without a pool the calls run here, before it returns."""
    if pool is None:
        timed = [_timed_call(fn, t) for t in tasks]
        return lambda: _outputs(timed)
    import joblib

    running = pool()(joblib.delayed(_timed_call)(fn, t) for t in tasks)
    return lambda: _outputs(list(running))


def _outputs(timed: list) -> tuple:
    return [o for o, _ in timed], sum(s for _, s in timed) / max(len(timed), 1)


def per_task(fn, tasks: list, pool=None) -> tuple:
    """[fn(*task) for task in tasks] (in the pool's workers if there is one) and the
    mean seconds per task of the calls themselves (not the wall time of the pool)."""
    return submit_tasks(fn, tasks, pool)()


def _classifier(name: str):
    """gpicl-eval's per-task classifiers (classification models) by name."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.neighbors import KNeighborsClassifier

    return {"sgd": lambda k: SGDClassifier(loss="log_loss", max_iter=100, tol=None,
                                           random_state=0),
            "logreg": lambda k: LogisticRegression(max_iter=1000),
            "knn": lambda k: KNeighborsClassifier(n_neighbors=min(5, k)),
            "random_forest": lambda k: RandomForestClassifier(100, random_state=0),
            "gbt": lambda k: GradientBoostingClassifier(random_state=0)}[name]


def classifier_proba(name: str, cx, cy, qx, n_classes: int):
    """Probabilities [q, n_classes] of a per-task learner fitted on the context."""
    if len(np.unique(cy)) < 2:  # one class: it is certain
        p = np.zeros((len(qx), n_classes))
        p[:, cy[0]] = 1.0
        return p
    k = int(np.bincount(cy).min())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _classifier(name)(k).fit(cx, cy)
        p = model.predict_proba(qx)
    out = np.zeros((len(qx), n_classes))
    out[:, model.classes_] = p
    return out
